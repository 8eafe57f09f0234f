"""Realistic inbound mail for worker tests: replies, out-of-office, DSNs, receipts, complaints.

Each builder returns the raw RFC 5322 bytes (CRLF) a mailbox would receive.
"""
from __future__ import annotations

import datetime as dt
import uuid


def _crlf(text: str) -> bytes:
    return text.replace("\r\n", "\n").replace("\n", "\r\n").encode()


def _date() -> str:
    return dt.datetime.now(dt.UTC).strftime("%a, %d %b %Y %H:%M:%S +0000")


def new_id(domain: str = "prospect.example") -> str:
    return f"<{uuid.uuid4().hex}@{domain}>"


def reply(*, sender: str, to: str, in_reply_to: str | None, references: str | None, cc: str | None = None,
          subject: str = "Re: Quick question about your pipeline", message_id: str | None = None,
          body: str = "Thanks, not interested right now. Please stop.") -> bytes:
    """A human reply as Outlook writes it (Thread-Index, comma-free References)."""
    lines = [
        f"From: {sender}",
        f"To: {to}",
        *( [f"Cc: {cc}"] if cc else [] ),
        f"Subject: {subject}",
        f"Date: {_date()}",
        f"Message-ID: {message_id or new_id(sender.split('@')[-1].strip('>'))}",
        *( [f"In-Reply-To: {in_reply_to}"] if in_reply_to else [] ),
        *( [f"References: {references}"] if references else [] ),
        "Thread-Index: AQHZxyzABCDEF0123456789==",
        "Content-Language: en-US",
        "MIME-Version: 1.0",
        'Content-Type: text/plain; charset="utf-8"',
        "Content-Transfer-Encoding: 7bit",
        "",
        body,
        "",
        "-----Original Message-----",
        "From: Rep <rep@ours.example>",
        "Subject: Quick question about your pipeline",
        "",
    ]
    return _crlf("\n".join(lines))


def out_of_office(*, sender: str, to: str, in_reply_to: str, return_text: str = "I will be back on 14 December 2026.",
                  message_id: str | None = None) -> bytes:
    """An Exchange automatic reply (OOF) to one of our sends."""
    return _crlf(f"""From: {sender}
To: {to}
Subject: Automatic reply: Quick question about your pipeline
Date: {_date()}
Message-ID: {message_id or new_id()}
In-Reply-To: {in_reply_to}
References: {in_reply_to}
Auto-Submitted: auto-replied
X-Auto-Response-Suppress: All
X-MS-Exchange-Inbox-Rules-Loop: {sender}
MIME-Version: 1.0
Content-Type: text/plain; charset="us-ascii"

Thank you for your message. I am out of the office with limited access to email.
{return_text}
For urgent matters please contact office@prospect.example.
""")


def dsn(*, to: str, failed: str, original_id: str, status: str = "5.1.1", action: str = "failed",
        message_id: str | None = None) -> bytes:
    """A delivery status notification (RFC 3464) with the original message's headers attached."""
    diagnostic = f"550 5.1.1 <{failed}>: Recipient address rejected: User unknown" \
        if status.startswith("5") else f"451 4.2.2 <{failed}>: Mailbox full, try again later"
    return _crlf(f"""Return-Path: <>
From: Mail Delivery System <MAILER-DAEMON@mx.ours.example>
To: {to}
Subject: {"Undelivered Mail Returned to Sender" if action == "failed" else "Delayed Mail (still being retried)"}
Date: {_date()}
Message-ID: {message_id or new_id("mx.ours.example")}
Auto-Submitted: auto-replied
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status; boundary="BOUNDARY"

--BOUNDARY
Content-Type: text/plain; charset=us-ascii

This is the mail system at host mx.ours.example.

I'm sorry to have to inform you that your message could not
be delivered to one or more recipients.

<{failed}>: {diagnostic}

--BOUNDARY
Content-Type: message/delivery-status

Reporting-MTA: dns; mx.ours.example
Arrival-Date: {_date()}

Final-Recipient: rfc822; {failed}
Original-Recipient: rfc822; {failed}
Action: {action}
Status: {status}
Diagnostic-Code: smtp; {diagnostic}

--BOUNDARY
Content-Type: text/rfc822-headers

From: Rep <{to}>
To: {failed}
Subject: Quick question about your pipeline
Message-ID: {original_id}
Date: {_date()}

--BOUNDARY--
""")


def read_receipt(*, sender: str, to: str, original_id: str, message_id: str | None = None) -> bytes:
    """An RFC 8098 disposition notification."""
    return _crlf(f"""From: {sender}
To: {to}
Subject: Read: Quick question about your pipeline
Date: {_date()}
Message-ID: {message_id or new_id()}
References: {original_id}
MIME-Version: 1.0
Content-Type: multipart/report; report-type=disposition-notification; boundary="MDN"

--MDN
Content-Type: text/plain; charset=us-ascii

Your message was read.

--MDN
Content-Type: message/disposition-notification

Reporting-UA: prospect.example; Microsoft Outlook 16.0
Final-Recipient: rfc822;{sender}
Original-Message-ID: {original_id}
Disposition: manual-action/MDN-sent-manually; displayed

--MDN--
""")


def complaint(*, to: str, original_id: str, message_id: str | None = None) -> bytes:
    """An ARF feedback report (RFC 5965): the recipient marked our send as spam."""
    return _crlf(f"""From: Abuse Desk <abuse@isp.example>
To: {to}
Subject: FW: Quick question about your pipeline
Date: {_date()}
Message-ID: {message_id or new_id("isp.example")}
MIME-Version: 1.0
Content-Type: multipart/report; report-type=feedback-report; boundary="ARF"

--ARF
Content-Type: text/plain; charset=us-ascii

This is an email abuse report for an email message received from you.

--ARF
Content-Type: message/feedback-report

Feedback-Type: abuse
User-Agent: SomeGenerator/1.0
Version: 1

--ARF
Content-Type: text/rfc822-headers

From: Rep <{to}>
Subject: Quick question about your pipeline
Message-ID: {original_id}

--ARF--
""")


def unrelated(*, to: str, message_id: str | None = None) -> bytes:
    return _crlf(f"""From: Newsletter <news@vendor.example>
To: {to}
Subject: Our November product update
Date: {_date()}
Message-ID: {message_id or new_id("vendor.example")}
List-Unsubscribe: <mailto:unsubscribe@vendor.example>
Precedence: bulk
MIME-Version: 1.0
Content-Type: text/plain; charset=utf-8

What's new this month.
""")
