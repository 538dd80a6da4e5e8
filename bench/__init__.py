"""The benchmark suite. Its tools run from the checkout as modules (`python3 -m bench.soak`;
`bench/run` for the main one), so that they import this checkout's `luafcgid` and the tests'
real daemon and nginx (`tests.conftest`) without touching `sys.path`."""
