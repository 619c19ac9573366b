"""RabbitMQ transport: the distributed mode of the contract in `shared.transport`.

Receivers, scanners and delivery agents on different hosts hand messages to
each other through durable quorum queues of one broker. The message travels
inside the AMQP message, so no shared file system is needed.

    topology.py    names, queue arguments and their declaration
    publisher.py   confirmed publishing, bounded by [broker].confirm_timeout
    transport.py   BrokerTransport: consumers, acks, retries, back-pressure

Topology (every name starts with `[broker].namespace`, here "smtpgw"):

    smtpgw.scan .deliver .bounce .quarantine    work queues; manual acks. A message returned more than
                                                [broker].delivery_limit times is dead-lettered to
                                                smtpgw.dead by the broker itself (a backstop: the
                                                consumer moves it there first, with the reason)
    smtpgw.deliver.deferred                     x-message-ttl = [delivery].retry_interval, then
                                                dead-lettered into smtpgw.deliver
    smtpgw.delay (headers exchange)
      └─ smtpgw.delay.<ms>                      one TTL queue per retry delay (RetryLater, crashes),
                                                dead-lettered back to the queue the job came from;
                                                the broker deletes it when unused (x-expires)
    smtpgw.dead                                 poison messages with `last_error`; the quarantine
                                                service consumes it and files each under "dead"
    smtpgw.events (fanout exchange)             broadcasts such as "rules updated"

Metrics: queue depths (`smtpgw_queue_depth`) and consumer counts
(`smtpgw_queue_consumers`) come from a passive `queue.declare`, whose answer
carries both: no management plugin is needed.

Every queue is a quorum queue and every message persistent; dead-lettering
uses the at-least-once strategy, so a message moving between queues is never
dropped. Per-message TTL only expires at the head of a queue, which is why
retries use one queue per delay instead of one queue with per-message TTLs:
a 30 s retry must not wait behind a 30 min one.

Wire format: the AMQP body is the spool file's frame (`shared.spool.pack`:
magic, envelope length, envelope JSON, message bytes), so a dead message
dumped to a file is a valid spool file. The envelope is not put in a header:
AMQP content headers must fit in one frame (128 KiB), and an envelope with a
thousand recipients and their failure replies may not; bodies are split
across frames, so messages of any size up to the broker's limit work.

Connections: a pika connection belongs to one thread, and RabbitMQ advises
separate connections for publishing and consuming (a resource alarm blocks
publishing connections; acks must still flow). So each transport has a few
publisher connections, each owned by a publisher thread, and one consumer
connection owned by a pump thread; workers talk to both only through queues
and `add_callback_threadsafe`.
"""

from shared.broker.topology import Names, delay_bucket, delay_queue_arguments, queue_arguments
from shared.broker.transport import BrokerTransport

__all__ = ["BrokerTransport", "Names", "delay_bucket", "delay_queue_arguments", "queue_arguments"]
