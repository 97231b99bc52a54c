from mailgate.cli import main

raise SystemExit(main())
