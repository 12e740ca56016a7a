#!/usr/bin/env python3
"""Small AWS client for the local moto server (boto3 from moto's venv): queues, EventBridge rules, events, SNS.

  moto-aws.py queue NAME [VISIBILITY_S]           -> prints the queue URL
  moto-aws.py route-eventbridge QUEUE_URL RULE SOURCE  (rule on the default bus: events of SOURCE -> the queue)
  moto-aws.py put-events FILE                     (JSON lines: {"Source", "DetailType", "Detail": {...}, "Time"?})
  moto-aws.py send QUEUE_URL FILE [PER_SECOND]    (one message body per line, SendMessageBatch of 10, paced)
  moto-aws.py send-bodies QUEUE_URL FILE          (one JSON string per line: bodies with newlines, up to 1 MiB)
  moto-aws.py route-sns QUEUE_URL TOPIC           (SNS topic -> the queue, raw delivery off) -> prints the topic ARN
  moto-aws.py publish TOPIC_ARN FILE              (one SNS message per line, PublishBatch of 10)
  moto-aws.py counts QUEUE_URL                    -> "visible not_visible"
Endpoint and credentials from AWS_ENDPOINT_URL (default http://127.0.0.1:45660), AWS_REGION, AWS_ACCESS_KEY_ID.
"""
import json, os, sys, time
from concurrent.futures import ThreadPoolExecutor

import boto3

EP = os.environ.get("AWS_ENDPOINT_URL", "http://127.0.0.1:45660")
KW = dict(endpoint_url=EP, region_name=os.environ.get("AWS_REGION", "us-east-1"),
          aws_access_key_id=os.environ.get("AWS_ACCESS_KEY_ID", "test"),
          aws_secret_access_key=os.environ.get("AWS_SECRET_ACCESS_KEY", "test"))


def chunks(items, n):
    return [items[i:i + n] for i in range(0, len(items), n)]


def main():
    cmd, args = sys.argv[1], sys.argv[2:]
    sqs = boto3.client("sqs", **KW)
    if cmd == "queue":
        attrs = {"VisibilityTimeout": args[1]} if len(args) > 1 else {}
        print(sqs.create_queue(QueueName=args[0], Attributes=attrs)["QueueUrl"])
    elif cmd == "route-eventbridge":
        url, rule, source = args
        arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
        ev = boto3.client("events", **KW)
        ev.put_rule(Name=rule, EventPattern=json.dumps({"source": [source]}))
        ev.put_targets(Rule=rule, Targets=[{"Id": "1", "Arn": arn}])
    elif cmd == "put-events":
        ev = boto3.client("events", **KW)
        entries = []
        for line in open(args[0]):
            if line.strip():
                e = json.loads(line)
                e["Detail"] = json.dumps(e["Detail"])
                entries.append(e)
        failed = 0
        for c in chunks(entries, 10):
            failed += ev.put_events(Entries=c).get("FailedEntryCount", 0)
        if failed:
            sys.exit(f"{failed} events failed")
        print(len(entries))
    elif cmd == "send":
        url = args[0]
        bodies = [l.rstrip("\n") for l in open(args[1]) if l.strip()]
        rate = float(args[2]) if len(args) > 2 else 0
        started = time.time()

        def send(c):
            r = sqs.send_message_batch(QueueUrl=url, Entries=[{"Id": str(i), "MessageBody": b} for i, b in enumerate(c)])
            return len(r.get("Failed", []))

        failed = 0
        with ThreadPoolExecutor(8) as pool:
            # Rounds of 100 messages, each no earlier than the rate allows.
            for i, part in enumerate(chunks(bodies, 100)):
                if rate > 0:
                    time.sleep(max(0.0, started + i * 100 / rate - time.time()))
                failed += sum(pool.map(send, chunks(part, 10)))
        if failed:
            sys.exit(f"{failed} messages failed")
        print(len(bodies))
    elif cmd == "send-bodies":
        bodies = [json.loads(l) for l in open(args[1]) if l.strip()]
        for b in bodies:
            sqs.send_message(QueueUrl=args[0], MessageBody=b)
        print(len(bodies))
    elif cmd == "route-sns":
        url, topic = args
        arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
        sns = boto3.client("sns", **KW)
        topic_arn = sns.create_topic(Name=topic)["TopicArn"]
        sns.subscribe(TopicArn=topic_arn, Protocol="sqs", Endpoint=arn, Attributes={"RawMessageDelivery": "false"})
        print(topic_arn)
    elif cmd == "publish":
        sns = boto3.client("sns", **KW)
        messages = [l.rstrip("\n") for l in open(args[1]) if l.strip()]
        failed = 0
        for c in chunks(messages, 10):
            r = sns.publish_batch(TopicArn=args[0], PublishBatchRequestEntries=[{"Id": str(i), "Message": m} for i, m in enumerate(c)])
            failed += len(r.get("Failed", []))
        if failed:
            sys.exit(f"{failed} messages failed")
        print(len(messages))
    elif cmd == "counts":
        a = sqs.get_queue_attributes(QueueUrl=args[0], AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"])["Attributes"]
        print(a["ApproximateNumberOfMessages"], a["ApproximateNumberOfMessagesNotVisible"])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
