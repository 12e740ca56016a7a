//! Engine messages as Flight data: batches as Arrow IPC (a schema message first, and again when it changes),
//! watermarks, barriers and end-of-stream as `app_metadata` on an otherwise empty message; credits going back the
//! same way.

use std::collections::HashMap;

use arrow::datatypes::{Schema, SchemaRef};
use arrow::ipc::writer::{DictionaryTracker, IpcDataGenerator, IpcWriteContext, IpcWriteOptions};
use arrow::ipc::{MessageHeader, root_as_message};
use arrow_flight::{FlightData, SchemaAsIpc};
use bytes::Bytes;
use nagare_core::{Barrier, CheckpointId, Message, Watermark};

use crate::error::ExchangeError;

const WATERMARK: u8 = b'W';
const IDLE: u8 = b'I';
const BARRIER: u8 = b'B';
const END: u8 = b'E';
const CREDIT: u8 = b'C';

/// Turns messages into Flight data, remembering the schema last sent.
#[derive(Default)]
pub struct Encoder {
    schema: Option<SchemaRef>,
    generator: IpcDataGenerator,
    options: IpcWriteOptions,
    context: IpcWriteContext,
}

fn control(tag: u8, payload: &[u8]) -> FlightData {
    let mut m = Vec::with_capacity(1 + payload.len());
    m.push(tag);
    m.extend_from_slice(payload);
    FlightData::new().with_app_metadata(Bytes::from(m))
}

impl Encoder {
    /// The frames for one message (two when a batch brings a new schema).
    pub fn encode(&mut self, message: Message) -> Result<Vec<FlightData>, ExchangeError> {
        Ok(match message {
            Message::Batch(batch) => {
                let mut out = Vec::with_capacity(2);
                let schema = batch.schema();
                if self.schema.as_ref().is_none_or(|s| !std::sync::Arc::ptr_eq(s, &schema) && **s != *schema) {
                    out.push(SchemaAsIpc::new(&schema, &self.options).into());
                    self.schema = Some(schema);
                }
                // A fresh tracker per batch: dictionaries are refused below, so there is nothing to remember.
                let mut tracker = DictionaryTracker::new(false);
                let (dictionaries, encoded) =
                    self.generator.encode(&batch, &mut tracker, &self.options, &mut self.context)?;
                if !dictionaries.is_empty() {
                    return Err(ExchangeError::Unsupported(
                        "dictionary-encoded columns cannot cross workers yet; cast them to their value type".into(),
                    ));
                }
                out.push(encoded.into());
                out
            }
            Message::Watermark(Watermark::EventTime(t)) => vec![control(WATERMARK, &t.to_le_bytes())],
            Message::Watermark(Watermark::Idle) => vec![control(IDLE, &[])],
            Message::Barrier(b) => {
                let mut p = b.checkpoint.0.to_le_bytes().to_vec();
                p.push(u8::from(b.then_stop));
                vec![control(BARRIER, &p)]
            }
            Message::EndOfStream => vec![control(END, &[])],
        })
    }
}

/// Turns Flight data back into messages.
#[derive(Default)]
pub struct Decoder {
    schema: Option<SchemaRef>,
}

fn le_u64(b: &[u8]) -> Result<u64, ExchangeError> {
    let arr: [u8; 8] = b.get(..8).and_then(|s| s.try_into().ok()).ok_or_else(|| bad("short control message"))?;
    Ok(u64::from_le_bytes(arr))
}

fn bad(why: &str) -> ExchangeError {
    ExchangeError::Protocol(why.to_string())
}

impl Decoder {
    /// The message a frame carries; `None` for a schema frame.
    pub fn decode(&mut self, data: FlightData) -> Result<Option<Message>, ExchangeError> {
        if data.data_header.is_empty() {
            let m = &data.app_metadata;
            let (tag, rest) = m.split_first().ok_or_else(|| bad("empty frame"))?;
            return Ok(Some(match *tag {
                WATERMARK => Message::Watermark(Watermark::EventTime(le_u64(rest)? as i64)),
                IDLE => Message::Watermark(Watermark::Idle),
                BARRIER => Message::Barrier(Barrier {
                    checkpoint: CheckpointId(le_u64(rest)?),
                    then_stop: rest.get(8).copied().unwrap_or(0) != 0,
                }),
                END => Message::EndOfStream,
                t => return Err(ExchangeError::Protocol(format!("unknown control frame {t:#x}"))),
            }));
        }
        let message = root_as_message(&data.data_header).map_err(|e| bad(&format!("bad IPC header: {e}")))?;
        match message.header_type() {
            MessageHeader::Schema => {
                self.schema = Some(std::sync::Arc::new(Schema::try_from(&data)?));
                Ok(None)
            }
            MessageHeader::RecordBatch => {
                let schema = self.schema.clone().ok_or_else(|| bad("a batch before its schema"))?;
                let batch = arrow_flight::utils::flight_data_to_arrow_batch(&data, schema, &HashMap::new())?;
                Ok(Some(Message::Batch(batch)))
            }
            other => Err(ExchangeError::Protocol(format!("unexpected IPC message {other:?}"))),
        }
    }
}

/// A frame granting the sender `n` more messages.
pub fn credit(n: u32) -> FlightData {
    control(CREDIT, &n.to_le_bytes())
}

/// The credits a frame grants.
pub fn read_credit(data: &FlightData) -> Result<u32, ExchangeError> {
    match data.app_metadata.split_first() {
        Some((&CREDIT, rest)) if rest.len() == 4 => Ok(u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]])),
        _ => Err(bad("expected a credit frame")),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::sync::Arc;

    use arrow::array::{Int64Array, StringArray, StructArray};
    use arrow::datatypes::{DataType, Field, Fields};
    use arrow::record_batch::RecordBatch;

    use super::*;

    #[test]
    fn messages_survive_the_round_trip() {
        let inner = Fields::from(vec![Field::new("amount", DataType::Int64, true)]);
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Utf8, false),
            Field::new("detail", DataType::Struct(inner.clone()), true),
        ]));
        let detail = StructArray::new(inner, vec![Arc::new(Int64Array::from(vec![Some(1), None]))], None);
        let batch =
            RecordBatch::try_new(schema, vec![Arc::new(StringArray::from(vec!["a", "b"])), Arc::new(detail)]).unwrap();
        let messages = vec![
            Message::Batch(batch.clone()),
            Message::Watermark(Watermark::EventTime(-5)),
            Message::Batch(batch.clone()),
            Message::Watermark(Watermark::Idle),
            Message::Barrier(Barrier { checkpoint: CheckpointId(7), then_stop: true }),
            Message::EndOfStream,
        ];
        let (mut enc, mut dec) = (Encoder::default(), Decoder::default());
        let mut frames = Vec::new();
        for m in messages {
            frames.extend(enc.encode(m).unwrap());
        }
        assert_eq!(frames.len(), 7, "one schema frame, then one per message");
        let out: Vec<Message> = frames.into_iter().filter_map(|f| dec.decode(f).unwrap()).collect();
        assert!(matches!(&out[0], Message::Batch(b) if *b == batch));
        assert!(matches!(out[1], Message::Watermark(Watermark::EventTime(-5))));
        assert!(matches!(&out[2], Message::Batch(b) if *b == batch));
        assert!(matches!(out[3], Message::Watermark(Watermark::Idle)));
        assert!(matches!(out[4], Message::Barrier(b) if b.checkpoint == CheckpointId(7) && b.then_stop));
        assert!(matches!(out[5], Message::EndOfStream));
        assert_eq!(read_credit(&credit(12)).unwrap(), 12);
        assert!(dec.decode(FlightData::new().with_app_metadata(Bytes::from_static(b"Z"))).is_err());
    }
}
