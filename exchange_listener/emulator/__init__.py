"""The project's own Exchange: an EWS emulator that unmodified exchangelib talks to over HTTP.

``store`` holds mailboxes, folders, items and subscriptions; ``soap`` reads and writes EWS XML;
``server`` is the aiohttp app (auth, operations, streaming, faults, test hooks); ``validation``
checks responses against Microsoft's schema when the test suite asks for it.

EWS operations: GetFolder, GetItem, FindItem (IsEqualTo on message:InternetMessageId only;
several ParentFolderIds answer one message each), SyncFolderItems, SyncFolderHierarchy,
Subscribe (streaming), Unsubscribe, GetStreamingEvents.

Test hooks (JSON): ``POST /emulator/mailboxes/{addr}/messages?folder=PATH`` (deliver),
``POST /emulator/mailboxes/{addr}/folders`` ``{"path", "folder_class"}``,
``DELETE /emulator/mailboxes/{addr}/folders?path=PATH``, ``POST /emulator/items/{id}/move?folder=PATH``,
``.../read``, ``.../touch``, ``DELETE /emulator/items/{id}[?purge=true]``, ``POST /emulator/faults``,
``GET /emulator/stats``. A PATH is a distinguished name or display names joined by ``/``
(``Customers/Acme``, ``Inbox/Sub``); missing user folders are created on demand.

Where it knowingly differs from Exchange:
- The folder tree is small: root, msgfolderroot with inbox, junkemail, sentitems, deleteditems,
  drafts, outbox, calendar, contacts, tasks, notes, and recoverableitemsroot with
  recoverableitemsdeletions. No search folders, no other hidden folders, no archive.
- Folder responses ignore FolderShape: always FolderId, ParentFolderId, FolderClass,
  DisplayName, TotalCount, ChildFolderCount (and UnreadCount where the type has it).
  Calendar/contacts/tasks folders come as CalendarFolder/ContactsFolder/TasksFolder.
- An item delivered into a non-mail folder is a plain ``t:Item`` with ItemClass IPM.Appointment,
  IPM.Contact, IPM.Task or IPM.StickyNote (no real calendar/contact properties); it keeps that
  class when moved. It raises CreatedEvent + ModifiedEvent(folder), never NewMailEvent.
- Hard delete (``DELETE /emulator/items/{id}``) always behaves like Exchange Online / 2013 with
  an all-folders subscription: MovedEvent to Deletions, ModifiedEvent for the old folder,
  DeletedEvent for the old id; subscriptions on single folders see the same events, filtered
  by folder. The AllItems search-folder DeletedEvent is not sent. Deleting an item already in
  Deletions purges it. Purge sends a DeletedEvent only (no folder ModifiedEvent).
- Creating a folder sends only a CreatedEvent (FolderId) to the parent's subscribers, not the
  parent's ModifiedEvent. Folders are never renamed or moved; deleting one (test hook) removes
  it with its subfolders and items at once (no events for those items).
- SyncFolderHierarchy without SyncFolderId syncs below msgfolderroot (the IPM subtree, what
  Exchange 2007's version of the operation, which had no SyncFolderId, synchronised). Each
  response returns every change (IncludesLastFolderInRange is always true). No Update is ever
  reported (nothing changes a folder's own properties).
- Per-mailbox errors (fault ``mailbox_error``) answer every response message of the chosen
  operations with that ResponseCode at HTTP 200; real Exchange may send some of them as an
  HTTP 500 SOAP fault instead. exchangelib raises the same error class either way.
- Ids are opaque but not Exchange's binary format; a subscription's watermark is not resumable
  (neither is Exchange's for streaming subscriptions).
"""
