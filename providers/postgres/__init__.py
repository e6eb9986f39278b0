"""The ``postgres`` provider: role passwords, with two alternating roles for no outage.

``provider`` holds the plugin; ``settings`` its TOML models; ``connections`` the admin and login
connections; ``markers`` the rotation marker each role carries; ``scram`` the password hashes.
"""
