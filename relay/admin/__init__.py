"""The operations shared by the CLI and the HTTP admin API, the API itself and its
OpenAPI document (``openapi.json``); and the public HTTP listener (``public``: one-click
unsubscribe, the provider webhooks).

May import smtp and everything below it; never process or cli.
"""
