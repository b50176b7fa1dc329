from benchmarks.leaderboard.harness import main

if __name__ == "__main__":  # not when a --workers child process imports it
    raise SystemExit(main())
