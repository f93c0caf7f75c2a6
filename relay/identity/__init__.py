"""Who is sending: AUTH (PLAIN, LOGIN), password hashing, users and apps, sender resolution,
and the throttling of failed AUTH attempts. Its Redis scripts are in ``lua/``.

May import observe, config, store, message and errors.
"""
