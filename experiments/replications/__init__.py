"""Paper replications: one module per paper, each registering itself with the harness
(`feynkit.experiments.harness.replication`); modules are discovered by `harness.discover`.
"""

from feynkit.experiments.harness import REGISTRY, discover, get, replication

__all__ = ["REGISTRY", "discover", "get", "replication"]
