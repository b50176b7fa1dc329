from benchmarks.meta_train.train import main

raise SystemExit(main())
