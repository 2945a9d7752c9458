"""Keeps every process of the test's multi-node Ray cluster on 127.0.0.1.

Imported at start-up by each Python process of that cluster only (its nodes
are started with this folder on PYTHONPATH by tests/ray_nodes.py): the ``ray``
CLIs, the dashboard and its agents, and every worker.

Ray takes 127.0.0.1 as "no address given": ``resolve_ip_for_localhost``
replaces it with the machine's routable address, and ``get_node_ip_address``
picks that address when a process has not joined a node yet. Nodes would
then advertise, listen on and call each other at the machine's network
address, and a process that asked for 127.0.0.1 would look for the cluster
there. Both functions are replaced as ``ray._private.services`` is first
imported, before any other module takes them from it.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys

LOOPBACK = "127.0.0.1"
MODULE = "ray._private.services"


class _KeepLoopback(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != MODULE:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        run_module = spec.loader.exec_module

        def exec_module(module):
            run_module(module)
            joined_node_ip = module.get_node_ip_address

            def get_node_ip_address(address=None):
                import ray._private.worker

                return joined_node_ip(address) if ray._private.worker._global_node is not None else LOOPBACK

            module.resolve_ip_for_localhost = lambda host: host
            module.get_node_ip_address = get_node_ip_address

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _KeepLoopback())
