from creditlab.cli import main

raise SystemExit(main())
