"""The benchmark behind ``embedq bench``, kept out of the product: nothing else in embedq
imports it.

- ``run``: runs the four variants side by side and gathers a report;
- ``variants``: what each variant does, in its own child process;
- ``report``: medians, ratios and the markdown for docs/benchmarks.md;
- ``servers``: private ``redis-server``, ``milvus-lite server`` and Milvus standalone
  processes on free ports, shared with the tests.
"""
