"""The mail the demo delivers: realistic RFC 5322 texts, as the rep's mailbox would receive them.

Each scenario is one outbound send (to a prospect, sometimes with a CC) and one incoming
message that answers it — or does not. The texts follow what the common clients and servers
really write (Outlook/Exchange, Gmail, Apple Mail, Exchange's automatic replies, a Postfix
DSN, a Thunderbird read receipt), with the send's Message-ID where each of them puts it.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import email.utils
import secrets
from collections.abc import Callable

MAILBOX = "alex.morgan@northwind.example"  # the rep's mailbox the listener watches
REP = f"Alex Morgan <{MAILBOX}>"
SEQUENCE = "seq-q4-finance-leaders"


@dataclasses.dataclass(frozen=True)
class Scenario:
    enrollment: str
    label: str
    to: tuple[str, ...]
    cc: tuple[str, ...]
    subject: str
    expect_status: str  # active (unchanged) | stopped | paused
    expect_reason: str | None
    build: Callable[[Scenario, str, dt.datetime], bytes]  # (scenario, send's Message-ID, now) -> message


def _date(moment: dt.datetime) -> str:
    return email.utils.format_datetime(moment.astimezone(dt.UTC))


def _mid(domain: str, style: str = "") -> str:
    if style == "outlook":
        token = secrets.token_hex(6).upper()
        return f"<DM6PR11MB{token}{secrets.token_hex(3).upper()}@DM6PR11MB{token}.namprd11.prod.outlook.com>"
    if style == "gmail":
        return f"<CA+{secrets.token_urlsafe(30)}@mail.gmail.com>"
    return f"<{secrets.token_hex(8)}.{secrets.token_hex(4)}@{domain}>"


def _crlf(text: str) -> bytes:
    return text.strip("\n").replace("\n", "\r\n").encode() + b"\r\n"


def return_date(now: dt.datetime) -> dt.date:
    """The out-of-office's stated return: two weeks ahead, so the pause is always in the future."""
    return (now + dt.timedelta(days=14)).date()


def prospect_reply(s: Scenario, send_id: str, now: dt.datetime) -> bytes:
    boundary = f"_000_{secrets.token_hex(12)}_"
    return _crlf(f"""
Received: from DM6PR11MB4291.namprd11.prod.outlook.com (2603:10b6:5:1d3::20) by
 SN6PR11MB3102.namprd11.prod.outlook.com with HTTPS; {_date(now)}
From: Dana Whitfield <dana.whitfield@acme-corp.example>
To: {REP}
Subject: RE: {s.subject}
Thread-Topic: {s.subject}
Thread-Index: AQHa{secrets.token_urlsafe(12)}
Date: {_date(now)}
Message-ID: {_mid("acme-corp.example", "outlook")}
References: {send_id}
In-Reply-To: {send_id}
Accept-Language: en-US
Content-Language: en-US
X-MS-Has-Attach:
X-MS-TNEF-Correlator:
Content-Type: multipart/alternative; boundary="{boundary}"
MIME-Version: 1.0

--{boundary}
Content-Type: text/plain; charset="us-ascii"
Content-Transfer-Encoding: quoted-printable

Hi Alex,

Thanks for reaching out. Month-end close is a real pain point for us right now =
- could you do a 30-minute call next Tuesday or Wednesday afternoon?

Best,
Dana

Dana Whitfield | VP Finance | Acme Corp

From: Alex Morgan <{MAILBOX}>
Sent: Monday, November 23, 2026 9:12 AM
To: Dana Whitfield <dana.whitfield@acme-corp.example>
Subject: {s.subject}

Hi Dana, teams like yours usually spend five or more days closing the books...

--{boundary}
Content-Type: text/html; charset="us-ascii"
Content-Transfer-Encoding: quoted-printable

<html><body><p>Hi Alex,</p><p>Thanks for reaching out. Month-end close is a real pain =
point for us right now - could you do a 30-minute call next Tuesday or Wednesday afternoon?</p>=
<p>Best,<br>Dana</p></body></html>

--{boundary}--
""")


def colleague_reply(s: Scenario, send_id: str, now: dt.datetime) -> bytes:
    """Lee forwarded the mail internally; Marco answers the forward, so the send's id is only in References."""
    forward_id = _mid("globex.example", "gmail")
    boundary = f"0000000000{secrets.token_hex(8)}"
    return _crlf(f"""
MIME-Version: 1.0
References: {send_id} {forward_id}
In-Reply-To: {forward_id}
From: Marco Ruiz <marco.ruiz@globex.example>
Date: {_date(now)}
Message-ID: {_mid("globex.example", "gmail")}
Subject: Re: Fwd: {s.subject}
To: {REP}
Cc: Lee Chen <lee.chen@globex.example>
Content-Type: multipart/alternative; boundary="{boundary}"

--{boundary}
Content-Type: text/plain; charset="UTF-8"

Hi Alex,

Lee passed your note on to me - I own procurement for our finance tools. We're
evaluating options in Q1; can you send pricing for ~40 seats?

Marco

On Tue, Nov 24, 2026 at 4:02 PM Lee Chen <lee.chen@globex.example> wrote:
> Marco, this one's for you.
>
> ---------- Forwarded message ---------
> From: Alex Morgan <{MAILBOX}>
> Subject: {s.subject}

--{boundary}
Content-Type: text/html; charset="UTF-8"

<div dir="ltr">Hi Alex,<div><br></div><div>Lee passed your note on to me - I own procurement
for our finance tools. We're evaluating options in Q1; can you send pricing for ~40 seats?</div>
<div><br></div><div>Marco</div></div>

--{boundary}--
""")


def cc_reply(s: Scenario, send_id: str, now: dt.datetime) -> bytes:
    boundary = f"Apple-Mail-{secrets.token_hex(4).upper()}-{secrets.token_hex(2).upper()}"
    return _crlf(f"""
Content-Type: multipart/alternative; boundary={boundary}
Content-Transfer-Encoding: 7bit
From: Priya Natarajan <priya.natarajan@initech.example>
Mime-Version: 1.0 (1.0)
Date: {_date(now)}
Subject: Re: {s.subject}
Message-Id: <{secrets.token_hex(4).upper()}-{secrets.token_hex(2).upper()}-{secrets.token_hex(6).upper()}@initech.example>
References: {send_id}
In-Reply-To: {send_id}
Cc: Sam Okafor <sam.okafor@initech.example>
To: {REP}
X-Mailer: iPhone Mail (21F90)


--{boundary}
Content-Type: text/plain; charset=utf-8
Content-Transfer-Encoding: quoted-printable

Sam's out this week, I'm picking this up. Not a fit for us this year =E2=80=94 please take us =
off the list.

Priya

Sent from my iPhone

> On Nov 24, 2026, at 10:05, Alex Morgan <{MAILBOX}> wrote:
>=20
> Hi Sam, quick question about your reporting stack...

--{boundary}
Content-Type: text/html; charset=utf-8
Content-Transfer-Encoding: quoted-printable

<html><body dir=3D"auto">Sam's out this week, I'm picking this up. Not a fit for us this =
year =E2=80=94 please take us off the list.<br><br>Priya<br><br>Sent from my iPhone</body></html>

--{boundary}--
""")


def out_of_office(s: Scenario, send_id: str, now: dt.datetime) -> bytes:
    back = return_date(now)
    back_text = f"{back:%A}, {back:%B} {back.day}, {back.year}"
    return _crlf(f"""
From: Kim Larsen <kim.larsen@umbrella-health.example>
To: {REP}
Subject: Automatic reply: {s.subject}
Thread-Topic: {s.subject}
Thread-Index: AQHa{secrets.token_urlsafe(12)}
Date: {_date(now)}
Message-ID: {_mid("umbrella-health.example", "outlook")}
References: {send_id}
In-Reply-To: {send_id}
Auto-Submitted: auto-generated
X-Auto-Response-Suppress: All
X-MS-Exchange-Inbox-Rules-Loop: kim.larsen@umbrella-health.example
X-MS-Exchange-Generated-Message-Source: Mailbox Rules Agent
Content-Language: en-US
Content-Type: text/plain; charset="us-ascii"
Content-Transfer-Encoding: 7bit
MIME-Version: 1.0

Thank you for your email. I am out of the office until {back_text} with limited
access to email. For anything urgent, please contact finance-ops@umbrella-health.example.

Kind regards,
Kim Larsen
""")


def hard_bounce(s: Scenario, send_id: str, now: dt.datetime) -> bytes:
    boundary = f"{secrets.token_hex(5).upper()}.{int(now.timestamp())}/mx1.northwind.example"
    queue_id = secrets.token_hex(5).upper()
    recipient = s.to[0]
    return _crlf(f"""
Return-Path: <>
Received: by mx1.northwind.example (Postfix) id {queue_id}; {_date(now)}
Date: {_date(now)}
From: MAILER-DAEMON@mx1.northwind.example (Mail Delivery System)
Subject: Undelivered Mail Returned to Sender
To: {MAILBOX}
Auto-Submitted: auto-replied
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status;
	boundary="{boundary}"
Content-Transfer-Encoding: 7bit
Message-Id: <20261127{secrets.token_hex(3)}.{queue_id}@mx1.northwind.example>

This is a MIME-encapsulated message.

--{boundary}
Content-Description: Notification
Content-Type: text/plain; charset=us-ascii

This is the mail system at host mx1.northwind.example.

I'm sorry to have to inform you that your message could not
be delivered to one or more recipients. It's attached below.

                   The mail system

<{recipient}>: host mx.hooli.example[203.0.113.25] said: 550 5.1.1
    <{recipient}>: Recipient address rejected: User unknown in virtual
    mailbox table (in reply to RCPT TO command)

--{boundary}
Content-Description: Delivery report
Content-Type: message/delivery-status

Reporting-MTA: dns; mx1.northwind.example
X-Postfix-Queue-ID: {queue_id}
X-Postfix-Sender: rfc822; {MAILBOX}
Arrival-Date: {_date(now - dt.timedelta(seconds=4))}

Final-Recipient: rfc822; {recipient}
Original-Recipient: rfc822;{recipient}
Action: failed
Status: 5.1.1
Remote-MTA: dns; mx.hooli.example
Diagnostic-Code: smtp; 550 5.1.1 <{recipient}>: Recipient address rejected:
    User unknown in virtual mailbox table

--{boundary}
Content-Description: Undelivered Message
Content-Type: message/rfc822

From: {REP}
To: <{recipient}>
Subject: {s.subject}
Date: {_date(now - dt.timedelta(seconds=5))}
Message-ID: {send_id}
MIME-Version: 1.0
Content-Type: text/plain; charset="utf-8"

Hi Jordan, teams like yours usually spend five or more days closing the books...

--{boundary}--
""")


def read_receipt(s: Scenario, send_id: str, now: dt.datetime) -> bytes:
    boundary = f"------------{secrets.token_hex(12)}"
    recipient = s.to[0]
    return _crlf(f"""
Message-ID: <{secrets.token_hex(8)}-{secrets.token_hex(4)}@stark-industries.example>
Date: {_date(now)}
MIME-Version: 1.0
User-Agent: Mozilla Thunderbird
From: Ron Becker <{recipient}>
To: {REP}
Subject: Return Receipt (displayed) - {s.subject}
References: {send_id}
In-Reply-To: {send_id}
Content-Type: multipart/report; report-type=disposition-notification;
 boundary="{boundary}"

This is a multi-part message in MIME format.
--{boundary}
Content-Type: text/plain; charset=UTF-8
Content-Transfer-Encoding: 7bit

This is a Return Receipt for the mail that you sent to {recipient}.

Note: This Return Receipt only acknowledges that the message was displayed on the recipient's
computer. There is no guarantee that the recipient has read or understood the message contents.

--{boundary}
Content-Type: message/disposition-notification; name="MDNPart2.txt"
Content-Disposition: inline
Content-Transfer-Encoding: 7bit

Reporting-UA: stark-industries.example; Mozilla Thunderbird
Final-Recipient: rfc822;{recipient}
Original-Message-ID: {send_id}
Disposition: manual-action/MDN-sent-manually; displayed

--{boundary}
Content-Type: text/rfc822-headers; name="MDNPart3.txt"
Content-Disposition: inline
Content-Transfer-Encoding: 7bit

From: {REP}
To: <{recipient}>
Subject: {s.subject}
Message-ID: {send_id}
Disposition-Notification-To: {REP}

--{boundary}--
""")


def unrelated(s: Scenario, send_id: str, now: dt.datetime) -> bytes:
    """A newsletter in the same inbox: no thread, nothing to match."""
    return _crlf(f"""
From: Northwind IT Service Desk <servicedesk@northwind.example>
To: All Staff <all-staff@northwind.example>
Subject: Planned maintenance: VPN gateway, Saturday 06:00-08:00 UTC
Date: {_date(now)}
Message-ID: {_mid("northwind.example")}
MIME-Version: 1.0
Content-Type: text/plain; charset="utf-8"
Content-Transfer-Encoding: 7bit
List-Id: <all-staff.northwind.example>
Precedence: bulk

Hello everyone,

The VPN gateway will be unavailable on Saturday between 06:00 and 08:00 UTC while we
apply security updates. Webmail and Teams are not affected.

Northwind IT Service Desk
""")


SCENARIOS: tuple[Scenario, ...] = (
    Scenario("enr-acme-dana", "prospect replies", ("dana.whitfield@acme-corp.example",), (),
             "Cutting month-end close time at Acme", "stopped", "replied", prospect_reply),
    Scenario("enr-globex-lee", "colleague replies (send id only in References)", ("lee.chen@globex.example",), (),
             "Faster close for Globex finance", "stopped", "replied", colleague_reply),
    Scenario("enr-initech-sam", "CC'd person replies", ("sam.okafor@initech.example",),
             ("priya.natarajan@initech.example",), "Initech's reporting stack", "stopped", "replied", cc_reply),
    Scenario("enr-umbrella-kim", "out-of-office with a return date", ("kim.larsen@umbrella-health.example",), (),
             "Close automation for Umbrella Health", "paused", None, out_of_office),
    Scenario("enr-hooli-jordan", "hard bounce (DSN, original attached)", ("jordan.blake@hooli.example",), (),
             "A question about Hooli's close", "stopped", "bounced", hard_bounce),
    Scenario("enr-stark-ron", "read receipt (MDN)", ("ron.becker@stark-industries.example",), (),
             "Stark's finance tooling", "active", None, read_receipt),
    Scenario("enr-wayne-nina", "unrelated mail in the inbox", ("nina.park@wayne-enterprises.example",), (),
             "Wayne Enterprises: closing faster", "active", None, unrelated),
)
