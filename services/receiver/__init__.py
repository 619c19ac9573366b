"""The receiver: the gateway's SMTP front door.

app.py       Receiver: listens, builds one ReceiverSMTP per connection, start()/stop()
smtp.py      ReceiverSMTP: aiosmtpd's session with our DATA reader, limits, enhanced codes
handler.py   aiosmtpd hooks: SMTP <-> policy, envelope, durable publish to the scan queue
policy.py    pure: relay control, recipient/sender/DATA decisions (code, status, text)
dataread.py  the chunked, smuggling-safe DATA reader
limits.py    shared counters: connections, in-flight DATA memory
trace.py     pure: the Received header
"""
