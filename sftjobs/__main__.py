from sftjobs.cli import main

raise SystemExit(main())
