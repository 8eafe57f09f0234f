"""IMAP source: IDLE per watched folder, a (UIDVALIDITY, UID) cursor per folder, BODY.PEEK fetches."""
