from difforge.cli import main

raise SystemExit(main())
