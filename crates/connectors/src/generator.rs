//! `connector = 'generator'`: EventBridge-shaped events at a given rate, with a share of re-deliveries of earlier
//! events (same id and body, up to `redelivery_delay` later in event time), deterministic for a seed.
//!
//! The same event text feeds `nagare gen w1`, so the benchmark file and the generator source agree.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use arrow::datatypes::SchemaRef;
use async_trait::async_trait;
use nagare_engine::EngineError;
use nagare_engine::connector::{Connector, Source, SourceContext, SourceEvent, SourceRestore, config};
use nagare_sql::SourceSpec;
use nagare_sql::catalog::{ConnectorSpec, TableDef, TableRole};
use nagare_sql::error::PlanError;
use nagare_sql::options::{OptionKind, OptionSpec};
use xxhash_rust::xxh3::xxh3_128_with_seed;

use crate::decode::{BadRecords, BlockDecoder, LineBase, TextFormat};

/// Top-level fields of a generated event.
pub const FIELDS: &[&str] =
    &["version", "id", "detail-type", "source", "account", "time", "region", "resources", "detail"];

const DETAIL_TYPES: &[&str] = &["Created", "Updated", "Approved", "Paid", "Sent"];
const SOURCES: &[&str] = &["app.docs", "app.pay", "app.bill"];
const REGIONS: &[&str] = &["us-east-1", "eu-west-1", "us-west-2"];
const CURRENCIES: &[&str] = &["USD", "EUR", "JPY", "GBP"];
const STATUSES: &[&str] = &["created", "pending", "approved", "paid", "sent"];

/// Options of the generator source.
pub const OPTIONS: &[OptionSpec] = &[
    OptionSpec::optional(
        "count",
        OptionKind::Int { min: 0, max: i64::MAX },
        Some("0"),
        "events to emit in total, re-deliveries included (0: unbounded)",
    ),
    OptionSpec::optional(
        "rate",
        OptionKind::Float { min: 0.0, max: 1e9 },
        Some("0"),
        "events per second over all subtasks (0: as fast as possible)",
    ),
    OptionSpec::optional(
        "duplicate_rate",
        OptionKind::Float { min: 0.0, max: 0.99 },
        Some("0"),
        "share of events that re-deliver an earlier one",
    ),
    OptionSpec::optional(
        "redelivery_delay",
        OptionKind::Duration,
        Some("30s"),
        "how far behind (event time) a re-delivery may be",
    ),
    OptionSpec::optional(
        "seed",
        OptionKind::Int { min: 0, max: i64::MAX },
        Some("42"),
        "random seed; the same seed gives the same events",
    ),
    OptionSpec::optional(
        "tenants",
        OptionKind::Int { min: 1, max: 1_000_000_000 },
        Some("100"),
        "distinct detail.tenant_id values",
    ),
    OptionSpec::optional(
        "start_time",
        OptionKind::String,
        None,
        "event time of the first event, RFC 3339 (default: now when rate > 0, else 2026-01-01T00:00:00Z)",
    ),
    OptionSpec::optional(
        "event_spacing",
        OptionKind::Duration,
        None,
        "event time between events when rate = 0 (default 1ms); with a rate it is 1/rate",
    ),
];

/// The generator's spec.
#[derive(Debug)]
pub struct GeneratorSpec;

impl ConnectorSpec for GeneratorSpec {
    fn name(&self) -> &'static str {
        "generator"
    }

    fn description(&self) -> &'static str {
        "synthetic EventBridge-shaped events with re-deliveries, for tests and benchmarks"
    }

    fn options(&self, role: TableRole) -> Option<&'static [OptionSpec]> {
        (role == TableRole::Source).then_some(OPTIONS)
    }

    fn validate(&self, table: &TableDef, _role: TableRole) -> Result<(), PlanError> {
        for f in table.schema.fields() {
            if !FIELDS.contains(&f.name().as_str()) {
                return Err(PlanError::invalid(format!(
                    "the generator has no field '{}'; it produces: {}",
                    f.name(),
                    FIELDS.join(", ")
                ))
                .at(table.location));
            }
        }
        if !table.has_columns {
            return Err(PlanError::invalid("the generator table needs its columns declared").at(table.location));
        }
        let o = &table.options;
        if o.is_set("event_spacing") && o.get_float("rate").unwrap_or(0.0) > 0.0 {
            return Err(o.error("event_spacing", "applies only when rate = 0 (with a rate, events are 1/rate apart)"));
        }
        if let Some(s) = o.get_str("start_time")
            && chrono::DateTime::parse_from_rfc3339(&s).is_err()
        {
            return Err(o.error("start_time", format!("'{s}' is not an RFC 3339 time such as 2026-01-01T00:00:00Z")));
        }
        Ok(())
    }

    fn configure(&self, table: &TableDef, _role: TableRole) -> Result<serde_json::Value, PlanError> {
        let o = &table.options;
        let start_us = match o.get_str("start_time") {
            Some(s) => Some(
                chrono::DateTime::parse_from_rfc3339(&s)
                    .map_err(|e| o.error("start_time", e.to_string()))?
                    .timestamp_micros(),
            ),
            None => None,
        };
        let config = GeneratorConfig {
            count: o.get_int("count").unwrap_or(0).max(0) as u64,
            rate: o.get_float("rate").unwrap_or(0.0),
            start_us,
            event_spacing_us: o.get_duration("event_spacing").map(|d| d.as_micros() as f64).unwrap_or(1_000.0),
            seed: o.get_int("seed").unwrap_or(42) as u64,
            duplicate_rate: o.get_float("duplicate_rate").unwrap_or(0.0),
            redelivery_us: o.get_duration("redelivery_delay").map(|d| d.as_micros() as i64).unwrap_or(30_000_000),
            tenants: o.get_int("tenants").unwrap_or(100).max(1) as u64,
        };
        serde_json::to_value(config).map_err(|e| PlanError::internal(format!("generator configuration: {e}")))
    }

    fn is_bounded(&self, table: &TableDef) -> bool {
        table.options.get_int("count").unwrap_or(0) > 0
    }
}

impl Connector for GeneratorSpec {
    fn create_source(
        &self,
        spec: &SourceSpec,
        schema: SchemaRef,
        ctx: SourceContext,
        restore: Option<&SourceRestore>,
    ) -> Result<Box<dyn Source>, EngineError> {
        let (subtask, parallelism) = (ctx.subtask, ctx.parallelism);
        let mut s = GeneratorSource::new(&config(&spec.table)?, spec, schema, ctx)?;
        if let Some(r) = restore {
            s.restore(&r.mine(subtask, parallelism))?;
        }
        Ok(Box::new(s))
    }
}

/// A generator table's configuration, parsed once at plan time.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct GeneratorConfig {
    /// Events in total (0: unbounded).
    pub count: u64,
    /// Events per second over all subtasks (0: as fast as possible).
    pub rate: f64,
    /// Event time of the first event, µs (none: now when paced, else 2026-01-01).
    pub start_us: Option<i64>,
    /// Event time between events when not paced, µs.
    pub event_spacing_us: f64,
    /// Seed.
    pub seed: u64,
    /// Share of re-deliveries.
    pub duplicate_rate: f64,
    /// How far behind a re-delivery may be, µs.
    pub redelivery_us: i64,
    /// Distinct tenants.
    pub tenants: u64,
}

/// Settings of an event stream.
#[derive(Debug, Clone)]
pub struct EventStreamConfig {
    /// Seed.
    pub seed: u64,
    /// Share of re-deliveries.
    pub duplicate_rate: f64,
    /// Event time of sequence 0, µs.
    pub start_us: i64,
    /// Event time between consecutive originals, µs (may be fractional through `rate`).
    pub spacing_us: f64,
    /// Maximum event-time lag of a re-delivery, µs.
    pub redelivery_us: i64,
    /// Distinct tenants.
    pub tenants: u64,
}

/// Generates event lines: originals with sequence numbers `first, first + stride, ...` and re-deliveries.
pub struct EventStream {
    config: EventStreamConfig,
    rng: fastrand::Rng,
    first: u64,
    next_seq: u64,
    stride: u64,
    recent: VecDeque<(i64, String)>,
    latest_us: i64,
}

/// Where an event stream is: enough to continue it exactly.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StreamPosition {
    /// Next original's sequence number.
    pub next_seq: u64,
    /// The random generator's state.
    pub rng: u64,
    /// Event time of the latest original, µs.
    pub latest_us: i64,
}

impl EventStream {
    /// A stream of the originals `first, first + stride, ...` (a subtask's share of a parallel generator).
    pub fn new(config: EventStreamConfig, first: u64, stride: u64) -> Self {
        let rng = fastrand::Rng::with_seed(config.seed ^ first.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        EventStream {
            config,
            rng,
            first,
            next_seq: first,
            stride: stride.max(1),
            recent: VecDeque::new(),
            latest_us: i64::MIN,
        }
    }

    /// Where the stream is.
    pub fn position(&self) -> StreamPosition {
        StreamPosition { next_seq: self.next_seq, rng: self.rng.get_seed(), latest_us: self.latest_us }
    }

    /// Continues from `position`: the recent originals that re-deliveries pick from are regenerated (each event is a
    /// function of its sequence number), so the rest of the stream is the same as without the interruption.
    pub fn resume(&mut self, position: &StreamPosition) {
        self.next_seq = position.next_seq;
        self.rng = fastrand::Rng::with_seed(position.rng);
        self.latest_us = position.latest_us;
        self.recent.clear();
        if self.config.duplicate_rate <= 0.0 || position.latest_us == i64::MIN {
            return;
        }
        let horizon = position.latest_us - self.config.redelivery_us;
        // Originals of this stream before next_seq, newest first, while within the re-delivery horizon.
        let mut seq = position.next_seq;
        let mut recent = Vec::new();
        while seq >= self.stride {
            seq -= self.stride;
            let t = self.config.start_us + (seq as f64 * self.config.spacing_us) as i64;
            if t < horizon {
                break;
            }
            let mut line = String::new();
            write_event(&self.config, seq, t, &mut line);
            recent.push((t, line));
        }
        recent.reverse();
        self.recent = recent.into();
    }

    /// Appends the next event and a newline to `out`; returns whether it was a re-delivery.
    pub fn next_line(&mut self, out: &mut String) -> bool {
        if !self.recent.is_empty() && self.config.duplicate_rate > 0.0 && self.rng.f64() < self.config.duplicate_rate {
            let i = self.rng.usize(..self.recent.len());
            out.push_str(&self.recent[i].1);
            out.push('\n');
            return true;
        }
        let seq = self.next_seq;
        self.next_seq += self.stride;
        let t = self.config.start_us + (seq as f64 * self.config.spacing_us) as i64;
        let start = out.len();
        write_event(&self.config, seq, t, out);
        if self.config.duplicate_rate > 0.0 {
            self.recent.push_back((t, out[start..].to_string()));
            self.latest_us = self.latest_us.max(t);
            while self.recent.front().is_some_and(|(rt, _)| *rt < self.latest_us - self.config.redelivery_us) {
                self.recent.pop_front();
            }
        }
        out.push('\n');
        false
    }
}

/// Writes one W1 event (without a newline) for sequence `seq` at event time `t_us`.
pub fn write_event(config: &EventStreamConfig, seq: u64, t_us: i64, out: &mut String) {
    let h = xxh3_128_with_seed(&seq.to_le_bytes(), config.seed);
    let (hi, lo) = ((h >> 64) as u64, h as u64);
    let pick = |list: &[&'static str], salt: u64| {
        list[((hi.rotate_left(salt as u32 * 7) ^ salt) % list.len() as u64) as usize]
    };
    let tenant = (lo % config.tenants) + 1;
    let doc = (hi >> 20) % 10_000_000;
    let cents = lo % 100_000;
    let time = chrono::DateTime::from_timestamp_micros(t_us)
        .map(|d| d.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_default();
    let region = pick(REGIONS, 3);
    let _ = write!(
        out,
        r#"{{"version":"0","id":"{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}","detail-type":"{}","source":"{}","account":"1234567890{:02}","time":"{}","region":"{}","resources":["s3://docs/{:07}"],"detail":{{"tenant_id":{},"document_id":"doc-{:07}","amount":{}.{:02},"currency":"{}","status":"{}"}}}}"#,
        hi >> 32,
        (hi >> 16) & 0xffff,
        hi & 0xfff,
        0x8000 | ((lo >> 48) & 0x3fff),
        lo & 0xffff_ffff_ffff,
        pick(DETAIL_TYPES, 1),
        pick(SOURCES, 2),
        tenant % 100,
        time,
        region,
        doc,
        tenant,
        doc,
        cents / 100,
        cents % 100,
        pick(CURRENCIES, 4),
        pick(STATUSES, 5),
    );
}

/// One lane of a generator: the originals `first, first + lanes, ...`, paced at its share of the rate. A job
/// starts with one lane per subtask; lanes keep their identity through rescales (a subtask may then run several).
struct Lane {
    stream: EventStream,
    remaining: Option<u64>,
    emitted: u64,
    started: Instant,
}

/// One subtask of a generator source.
pub struct GeneratorSource {
    config: EventStreamConfig,
    lanes: Vec<Lane>,
    lanes_total: u64,
    /// Events per second per lane.
    rate: f64,
    lines: u64,
    decoder: BlockDecoder,
    batch_size: usize,
    text: String,
    origin: String,
}

impl GeneratorSource {
    /// Subtask `ctx.subtask` of a generator (configured by `c`) producing `schema`.
    pub fn new(
        c: &GeneratorConfig,
        spec: &SourceSpec,
        schema: SchemaRef,
        ctx: SourceContext,
    ) -> Result<Self, EngineError> {
        let (count, rate) = (c.count, c.rate);
        let p = ctx.parallelism as u64;
        let i = ctx.subtask as u64;
        let remaining = (count > 0).then(|| count / p + u64::from(i < count % p));
        let start_us = match c.start_us {
            Some(us) => us,
            None if rate > 0.0 => chrono::Utc::now().timestamp_micros(),
            None => 1_767_225_600_000_000, // 2026-01-01T00:00:00Z
        };
        let spacing_us = if rate > 0.0 { 1e6 / rate } else { c.event_spacing_us };
        let config = EventStreamConfig {
            seed: c.seed,
            duplicate_rate: c.duplicate_rate,
            start_us,
            spacing_us,
            redelivery_us: c.redelivery_us,
            tenants: c.tenants,
        };
        let origin = format!("source {}", spec.table.name);
        let decoder = BlockDecoder::new(
            TextFormat::Json,
            schema,
            spec.table.schema.clone(),
            spec.projection.clone(),
            BadRecords::Fail,
            None,
            ctx.metrics.clone(),
            origin.clone(),
        )?;
        let lane =
            Lane { stream: EventStream::new(config.clone(), i, p), remaining, emitted: 0, started: Instant::now() };
        Ok(GeneratorSource {
            config,
            lanes: vec![lane],
            lanes_total: p,
            rate: rate / p as f64,
            lines: 0,
            decoder,
            batch_size: ctx.batch_size,
            text: String::new(),
            origin,
        })
    }
}

/// A generator lane's checkpoint position.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct LanePosition {
    first: u64,
    stream: StreamPosition,
    emitted: u64,
    remaining: Option<u64>,
}

/// A generator subtask's checkpoint position: its lanes, out of how many.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct GeneratorPosition {
    lanes_total: u64,
    lanes: Vec<LanePosition>,
}

impl GeneratorSource {
    /// Continues the lanes of checkpoint `positions` (one subtask's, or several after a rescale; none leaves this
    /// subtask without work).
    pub fn restore(&mut self, positions: &[&serde_json::Value]) -> Result<(), EngineError> {
        let total_rate = self.rate * self.lanes_total as f64;
        self.lanes.clear();
        for position in positions {
            let p: GeneratorPosition = serde_json::from_value((*position).clone())
                .map_err(|e| EngineError::Config(format!("checkpoint position of a generator is not valid: {e}")))?;
            self.lanes_total = p.lanes_total.max(1);
            self.rate = total_rate / self.lanes_total as f64;
            for l in p.lanes {
                let mut stream = EventStream::new(self.config.clone(), l.first, self.lanes_total);
                stream.resume(&l.stream);
                // Pacing continues from here rather than catching up on the time the job was down.
                let ahead = if self.rate > 0.0 { l.emitted as f64 / self.rate } else { 0.0 };
                let started = Instant::now() - Duration::from_secs_f64(ahead);
                self.lanes.push(Lane { stream, remaining: l.remaining, emitted: l.emitted, started });
            }
        }
        Ok(())
    }
}

#[async_trait]
impl Source for GeneratorSource {
    fn snapshot_position(&mut self, _checkpoint: nagare_core::CheckpointId) -> Result<serde_json::Value, EngineError> {
        let lanes = self
            .lanes
            .iter()
            .map(|l| LanePosition {
                first: l.stream.first,
                stream: l.stream.position(),
                emitted: l.emitted,
                remaining: l.remaining,
            })
            .collect();
        serde_json::to_value(GeneratorPosition { lanes_total: self.lanes_total, lanes })
            .map_err(|e| EngineError::Internal(e.to_string()))
    }

    async fn next(&mut self) -> Result<SourceEvent, EngineError> {
        if self.lanes.iter().all(|l| l.remaining == Some(0)) {
            return Ok(SourceEvent::End);
        }
        // What each lane may emit now: its events left, and (paced) what is due; otherwise wait for the first due.
        let mut wait: Option<Duration> = None;
        let mut budget = vec![0usize; self.lanes.len()];
        for (i, lane) in self.lanes.iter().enumerate() {
            let mut n = self.batch_size;
            if let Some(r) = lane.remaining {
                n = n.min(r as usize);
            }
            if n > 0 && self.rate > 0.0 {
                // Pace: never ahead of the rate, in batches of about a tenth of a second.
                let due = (lane.started.elapsed().as_secs_f64() * self.rate) as u64;
                if due <= lane.emitted {
                    let w = ((lane.emitted + 1) as f64 / self.rate - lane.started.elapsed().as_secs_f64()).max(0.001);
                    let w = Duration::from_secs_f64(w);
                    wait = Some(wait.map_or(w, |x| x.min(w)));
                    continue;
                }
                n = n.min((due - lane.emitted) as usize).min(((self.rate / 10.0) as usize).max(1));
            }
            budget[i] = n;
        }
        let n = budget.iter().sum::<usize>().min(self.batch_size);
        if n == 0 {
            return Ok(SourceEvent::Idle(wait.unwrap_or(Duration::from_millis(1))));
        }
        // Lanes are merged in sequence order (= event-time order): after a rescale put several lanes on this
        // subtask, none runs ahead of the others and pushes the watermark past events still to come.
        self.text.clear();
        for _ in 0..n {
            let Some(i) =
                (0..self.lanes.len()).filter(|i| budget[*i] > 0).min_by_key(|i| self.lanes[*i].stream.next_seq)
            else {
                break;
            };
            budget[i] -= 1;
            let lane = &mut self.lanes[i];
            lane.stream.next_line(&mut self.text);
            lane.emitted += 1;
            if let Some(r) = lane.remaining.as_mut() {
                *r -= 1;
            }
        }
        self.lines += n as u64;
        match self.decoder.decode(self.text.as_bytes(), &self.origin, LineBase::Line(self.lines - n as u64 + 1))? {
            Some(batch) => Ok(SourceEvent::Batch(batch)),
            None => Ok(SourceEvent::Idle(Duration::ZERO)),
        }
    }
}

/// Event-stream settings for `nagare gen w1`: 1 ms apart from 2026-01-01, re-deliveries up to 30 s late.
pub fn w1_config(seed: u64, duplicate_rate: f64) -> EventStreamConfig {
    EventStreamConfig {
        seed,
        duplicate_rate,
        start_us: 1_767_225_600_000_000,
        spacing_us: 1_000.0,
        redelivery_us: 30_000_000,
        tenants: 100,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_deterministic_and_about_315_bytes() {
        let mut a = EventStream::new(w1_config(7, 0.1), 0, 1);
        let mut b = EventStream::new(w1_config(7, 0.1), 0, 1);
        let (mut ta, mut tb) = (String::new(), String::new());
        let mut dups = 0;
        for _ in 0..10_000 {
            dups += usize::from(a.next_line(&mut ta));
            b.next_line(&mut tb);
        }
        assert_eq!(ta, tb);
        assert!((800..1200).contains(&dups), "about 10% re-deliveries, got {dups}");
        let avg = ta.len() / 10_000;
        assert!((290..340).contains(&avg), "average line length {avg}");
        let first: serde_json::Value = serde_json::from_str(ta.lines().next().unwrap()).unwrap();
        assert_eq!(first["time"], "2026-01-01T00:00:00.000Z");
        assert_eq!(first["id"].as_str().unwrap().len(), 36);
    }

    #[test]
    fn a_resumed_stream_continues_exactly() {
        let mut whole = EventStream::new(w1_config(3, 0.3), 1, 2);
        let mut expected = String::new();
        for _ in 0..6_000 {
            whole.next_line(&mut expected);
        }
        let mut first = EventStream::new(w1_config(3, 0.3), 1, 2);
        let mut got = String::new();
        for _ in 0..2_500 {
            first.next_line(&mut got);
        }
        let position = first.position();
        let mut resumed = EventStream::new(w1_config(3, 0.3), 1, 2);
        resumed.resume(&position);
        for _ in 2_500..6_000 {
            resumed.next_line(&mut got);
        }
        assert_eq!(got, expected);
    }

    #[test]
    fn redeliveries_repeat_recent_events_exactly() {
        let mut s = EventStream::new(w1_config(1, 0.5), 0, 1);
        let mut seen = std::collections::HashMap::new();
        let mut text = String::new();
        for _ in 0..5_000 {
            text.clear();
            let dup = s.next_line(&mut text);
            let v: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
            let id = v["id"].as_str().unwrap().to_string();
            if dup {
                assert_eq!(seen.get(&id), Some(&text), "a re-delivery has the same body");
            } else {
                assert!(seen.insert(id, text.clone()).is_none(), "originals have unique ids");
            }
        }
    }
}
