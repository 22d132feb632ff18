"""`python -m benchmarks [--quick|--smoke]`: run every benchmark, print the table, write the JSON."""

from benchmarks.run import main

raise SystemExit(main())
