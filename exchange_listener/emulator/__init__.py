"""The project's own Exchange: an EWS emulator that unmodified exchangelib talks to over HTTP.

``store`` holds mailboxes, items and subscriptions; ``soap`` reads and writes EWS XML;
``server`` is the aiohttp app (auth, operations, streaming, faults); ``validation`` checks
responses against Microsoft's schema when the test suite asks for it.
"""
