"""pytest-benchmark suites (bench_<op>.py), their shared harness, the report and the one-command GPU check."""
