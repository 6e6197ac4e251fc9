"""Send one message per recipient through the relay under test: send.py HOST:PORT RCPT..."""

import smtplib
import sys

host, port = sys.argv[1].rsplit(":", 1)
for rcpt in sys.argv[2:]:
    msg = (
        f"From: lab@client.lab\r\nTo: {rcpt}\r\nSubject: container lab to {rcpt}\r\n\r\n"
        "hello from the container lab\r\n"
    )
    with smtplib.SMTP(host, int(port), timeout=30) as s:
        s.sendmail("lab@client.lab", [rcpt], msg)
    print(f"queued for {rcpt}")
