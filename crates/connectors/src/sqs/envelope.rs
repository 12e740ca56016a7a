//! From a message body to the JSON lines the projected decoder reads: the EventBridge event as is (checked to be
//! one), the `Message` of an SNS notification, or the raw body; one line per record.

use memchr::memmem;
use serde::Deserialize;

use super::{Envelope, Format};

/// Appends the records of one message body to `block`, each as one line ending in `\n`; returns how many records
/// it holds, or why the body is not what the table's envelope and format say.
pub fn unwrap_into(envelope: Envelope, format: Format, body: &str, block: &mut Vec<u8>) -> Result<usize, String> {
    match envelope {
        Envelope::Raw => records_into(format, body, block),
        Envelope::Eventbridge => {
            let b = body.as_bytes();
            if looks_like_sns(b) {
                return Err("an SNS notification, not an EventBridge event (envelope = 'sns'?)".into());
            }
            if memmem::find(b, b"\"detail-type\"").is_none() {
                return Err("not an EventBridge event: it has no \"detail-type\" field".into());
            }
            records_into(Format::Json, body, block)
        }
        Envelope::Sns => {
            #[derive(Deserialize)]
            struct Notification {
                #[serde(rename = "Type")]
                kind: Option<String>,
                #[serde(rename = "Message")]
                message: Option<String>,
            }
            let n: Notification =
                serde_json::from_str(body).map_err(|e| format!("not an SNS notification: not JSON ({e})"))?;
            match (n.kind.as_deref(), n.message) {
                (Some("Notification"), Some(m)) => records_into(format, &m, block),
                (Some(other), _) => Err(format!("an SNS '{other}' message, not a Notification")),
                _ => Err("not an SNS notification: no \"Type\": \"Notification\" with a \"Message\" (raw message \
                          delivery on? then use envelope = 'raw')"
                    .into()),
            }
        }
    }
}

/// An SNS notification's top-level members.
fn looks_like_sns(b: &[u8]) -> bool {
    memmem::find(b, b"\"TopicArn\"").is_some() && memmem::find(b, b"\"Type\"").is_some()
}

fn records_into(format: Format, text: &str, block: &mut Vec<u8>) -> Result<usize, String> {
    match format {
        Format::Json => {
            let t = text.trim();
            if t.is_empty() {
                return Err("empty body".into());
            }
            if !t.starts_with('{') {
                return Err("not a JSON object".into());
            }
            push_line(t.as_bytes(), block);
            Ok(1)
        }
        Format::JsonLines => {
            let mut n = 0;
            for line in text.split('\n') {
                let l = line.trim();
                if l.is_empty() {
                    continue;
                }
                if !l.starts_with('{') {
                    return Err(format!("line {} is not a JSON object", n + 1));
                }
                push_line(l.as_bytes(), block);
                n += 1;
            }
            if n == 0 {
                return Err("empty body".into());
            }
            Ok(n)
        }
    }
}

/// One record on one line. Line breaks inside a JSON value can only be whitespace between tokens (JSON strings
/// cannot hold raw line breaks), so they become spaces.
fn push_line(record: &[u8], block: &mut Vec<u8>) {
    if memchr::memchr2(b'\n', b'\r', record).is_some() {
        block.extend(record.iter().map(|b| if matches!(b, b'\n' | b'\r') { b' ' } else { *b }));
    } else {
        block.extend_from_slice(record);
    }
    block.push(b'\n');
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    const EVENT: &str = r#"{"version":"0","id":"e1","detail-type":"Created","source":"app","time":"2026-01-01T00:00:00Z","detail":{"a":1}}"#;

    fn lines(envelope: Envelope, format: Format, body: &str) -> Result<(usize, String), String> {
        let mut block = Vec::new();
        let n = unwrap_into(envelope, format, body, &mut block)?;
        Ok((n, String::from_utf8(block).unwrap()))
    }

    #[test]
    fn eventbridge_events_pass_through_as_one_line() {
        assert_eq!(lines(Envelope::Eventbridge, Format::Json, EVENT).unwrap(), (1, format!("{EVENT}\n")));
        // Pretty-printed: one line, the same JSON.
        let pretty = serde_json::to_string_pretty(&serde_json::from_str::<serde_json::Value>(EVENT).unwrap()).unwrap();
        let (n, text) = lines(Envelope::Eventbridge, Format::Json, &pretty).unwrap();
        assert_eq!(n, 1);
        assert_eq!(text.matches('\n').count(), 1);
        let back: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(back, serde_json::from_str::<serde_json::Value>(EVENT).unwrap());
    }

    #[test]
    fn sns_notifications_give_their_message() {
        let note = serde_json::json!({
            "Type": "Notification", "MessageId": "m", "TopicArn": "arn:aws:sns:us-east-1:1:t",
            "Message": format!("{EVENT}\n{EVENT}"), "Timestamp": "2026-01-01T00:00:00Z",
        })
        .to_string();
        assert_eq!(lines(Envelope::Sns, Format::JsonLines, &note).unwrap(), (2, format!("{EVENT}\n{EVENT}\n")));
        let one = note.replace("\\n", " ");
        assert_eq!(lines(Envelope::Sns, Format::Json, &one).unwrap().0, 1);
        // The wrong envelope either way round, and bodies that are not JSON.
        let e = lines(Envelope::Eventbridge, Format::Json, &note).unwrap_err();
        assert!(e.contains("SNS notification"), "{e}");
        let e = lines(Envelope::Sns, Format::Json, EVENT).unwrap_err();
        assert!(e.contains("not an SNS notification"), "{e}");
        let e = lines(Envelope::Sns, Format::Json, "hello").unwrap_err();
        assert!(e.contains("not JSON"), "{e}");
        let sub = serde_json::json!({"Type": "SubscriptionConfirmation", "TopicArn": "t", "Message": "x"}).to_string();
        assert!(lines(Envelope::Sns, Format::Json, &sub).unwrap_err().contains("SubscriptionConfirmation"));
    }

    #[test]
    fn raw_bodies_and_json_lines() {
        assert_eq!(lines(Envelope::Raw, Format::Json, " {\"a\":1} ").unwrap(), (1, "{\"a\":1}\n".into()));
        assert_eq!(lines(Envelope::Raw, Format::JsonLines, "{\"a\":1}\n\n{\"a\":2}\r\n").unwrap().0, 2);
        assert_eq!(lines(Envelope::Raw, Format::Json, "").unwrap_err(), "empty body");
        assert_eq!(lines(Envelope::Raw, Format::Json, "[1]").unwrap_err(), "not a JSON object");
        assert!(lines(Envelope::Raw, Format::JsonLines, "{}\nnope").unwrap_err().contains("line 2"));
        let e = lines(Envelope::Eventbridge, Format::Json, "{\"a\":1}").unwrap_err();
        assert!(e.contains("detail-type"), "{e}");
    }
}
