"""The ``http`` provider: any service with a create and a revoke endpoint, described in TOML.

``provider`` holds the plugin; ``settings`` the TOML model; ``templates`` the ``{vars.X}``
expansion; ``sending`` the requests and what their answers mean.
"""
