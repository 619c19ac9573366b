"""What the RabbitMQ transport costs in CPU per message, beside bare pika in the same run.

`python -m bench.transport [--messages N] [--url URL]`, with RabbitMQ running:

- pika: the floor. N persistent ~85 KB messages published with a confirm each
  from one BlockingConnection, then consumed and acked one by one (prefetch 16),
  on a quorum queue of their own;
- smtpgw: the same messages through `BrokerTransport` the way the gateway moves
  them: published to scan from 8 threads (receivers), consumed by 16 workers
  that publish each one to deliver (a scanner passing clean mail on), consumed
  there by 8 workers that produce nothing (delivery).

It prints CPU microseconds per message of this process (user + system) for
each step, and the transport's total over pika's: the Python work a message
costs in the gateway's broker hops, apart from scanning and SMTP. The broker's
own CPU is not in it (bench/run.py's budget has it). Queues are removed after.
"""

from __future__ import annotations

import argparse
import random
import resource
import sys
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime

import pika

from shared.broker import BrokerTransport
from shared.config import BrokerConfig
from shared.envelope import Client, Envelope, new_queue_id
from shared.transport import Job, Output, Queue

SIZE = 86_000  # the corpus's mean message, about
PUBLISHERS = 8
SCAN_WORKERS = 16
DELIVER_WORKERS = 8


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def timed(step: Callable[[], None], count: int) -> tuple[float, float]:
    """(CPU µs per message, messages per second) of `step` over `count` messages."""
    cpu_before, started = cpu(), time.monotonic()
    step()
    return (cpu() - cpu_before) / count * 1e6, count / max(1e-9, time.monotonic() - started)


def bare_pika(url: str, body: bytes, count: int) -> dict[str, tuple[float, float]]:
    params = pika.URLParameters(url)
    name = f"bench-pika-{uuid.uuid4().hex[:8]}"
    conn = pika.BlockingConnection(params)
    channel = conn.channel()
    channel.queue_declare(name, durable=True, arguments={"x-queue-type": "quorum"})
    try:
        channel.confirm_delivery()
        props = pika.BasicProperties(delivery_mode=2)

        def publish() -> None:
            for _ in range(count):
                channel.basic_publish("", name, body, props, mandatory=True)

        got = [0]

        def on_message(ch: object, method: object, _props: object, _body: bytes) -> None:
            got[0] += 1
            channel.basic_ack(method.delivery_tag)  # type: ignore[attr-defined]

        def consume() -> None:
            channel.basic_qos(prefetch_count=16)
            channel.basic_consume(name, on_message)
            while got[0] < count:
                conn.process_data_events(time_limit=0.2)

        return {"publish": timed(publish, count), "consume": timed(consume, count)}
    finally:
        channel.queue_delete(name)
        conn.close()


def envelope(body: bytes) -> Envelope:
    return Envelope(
        queue_id=new_queue_id(),
        received_at=datetime.now(UTC).replace(microsecond=0),
        client=Client(ip="192.0.2.7", helo="mx.sender.test"),
        mail_from="alice@sender.test",
        rcpt_to=("bob@example.test",),
        size=len(body),
    )


def gateway(url: str, body: bytes, count: int) -> dict[str, tuple[float, float]]:
    config = BrokerConfig(url=url, namespace=f"bench-transport-{uuid.uuid4().hex[:8]}")
    transport = BrokerTransport(config, retry_interval=60.0)
    envelopes = [envelope(body) for _ in range(count)]
    delivered = threading.Semaphore(0)
    try:

        def publish() -> None:
            def receiver(k: int) -> None:
                for env in envelopes[k::PUBLISHERS]:
                    transport.publish(Queue.SCAN, env, body)

            threads = [threading.Thread(target=receiver, args=(k,)) for k in range(PUBLISHERS)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()

        def scan(job: Job) -> list[Output]:
            return [Output(Queue.DELIVER, job.envelope, job.body)]

        def deliver(job: Job) -> list[Output]:
            delivered.release()
            return []

        def consume() -> None:
            transport.consume(Queue.SCAN, scan, SCAN_WORKERS)
            transport.consume(Queue.DELIVER, deliver, DELIVER_WORKERS)
            transport.start()
            for _ in range(count):
                if not delivered.acquire(timeout=120):
                    raise SystemExit("bench.transport: messages stopped arriving")
            transport.wait_idle(30)  # the last acks

        return {"publish": timed(publish, count), "scan, then deliver": timed(consume, count)}
    finally:
        transport.stop(10)
        cleanup = BrokerTransport(config, retry_interval=60.0)
        cleanup.delete_topology(transport.declared_delay_queues)
        cleanup.stop(5)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.transport", description="CPU per message of the RabbitMQ transport"
    )
    p.add_argument("--messages", type=int, default=2000)
    p.add_argument("--url", default="amqp://guest:guest@127.0.0.1:5672/%2F")
    args = p.parse_args(argv)
    body = random.Random(1).randbytes(SIZE * 3 // 4).hex().encode()[:SIZE]
    floor = bare_pika(args.url, body, args.messages)
    ours = gateway(args.url, body, args.messages)
    for label, results in (("pika", floor), ("smtpgw", ours)):
        for step, (micros, per_second) in results.items():
            print(f"{label:7} {step:19} {micros:6.0f} µs CPU/message  {per_second:6.0f}/s")
    # A message crosses the broker twice in the gateway (receiver -> scanner -> delivery).
    floor_total = 2 * (floor["publish"][0] + floor["consume"][0])
    ours_total = ours["publish"][0] + ours["scan, then deliver"][0]
    print(
        f"transport per message: {ours_total:.0f} µs CPU, {ours_total / floor_total:.2f}× bare pika ({floor_total:.0f})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
