"""
The operator's side of omerta: the C{omerta} command line, twistd plugins'
Options and services, the manhole and metrics.
"""
