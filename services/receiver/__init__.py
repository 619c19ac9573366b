"""The receiver: the gateway's SMTP front door.

app.py        Receiver: listens, builds one ReceiverSMTP per connection, start()/stop()
smtp.py       ReceiverSMTP: aiosmtpd's session with our DATA reader, limits, enhanced codes
handler.py    aiosmtpd hooks: SMTP <-> policy, envelope, durable publish to the scan queue
policy.py     pure: relay control, recipient/sender/DATA decisions (code, status, text)
dataread.py   the chunked, smuggling-safe DATA reader
limits.py     counters: connections, in-flight DATA memory (shared by a group of processes)
offload.py    worker threads for the blocking transport calls
processes.py  the other processes of `[receiver].processes`, on the same port
trace.py      pure: the Received header
"""
