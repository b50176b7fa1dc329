from benchmarks.leaderboard.harness import main

raise SystemExit(main())
