"""The host's kernel, set up from Python: named network namespaces (``netns``)
and links, addresses, routes, rules and sysctls with an undo stack
(``netconfig``, through pyroute2). Nothing here imports the rest of relay/.
"""
