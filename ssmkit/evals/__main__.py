from ssmkit.evals import main

raise SystemExit(main())
