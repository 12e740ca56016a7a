//! JSON lines straight into Arrow buffers for the declared schema, reading only the fields the query uses.
//!
//! arrow-json tokenizes every byte of a record onto a tape before it builds columns; for wide events of which a
//! pipeline reads a few fields, most of that work is thrown away. This decoder walks each record once: fields the
//! projected schema does not name are skipped (their syntax still checked), the others are parsed into column
//! buffers as they are met.
//!
//! It accepts a subset of what arrow-json accepts and, for that subset, produces the same columns (tested against
//! arrow-json on generated records). Anything outside it — a type it does not handle, a value of another JSON type
//! than the column's, a duplicate key, a number outside strict JSON syntax, a UTF-16 surrogate escape, malformed
//! input — makes it *decline* the whole block, and the caller decodes that block with arrow-json, whose behaviour
//! (coercions, errors and their messages) stays the reference.

use std::sync::Arc;

use arrow::array::timezone::Tz;
use arrow::array::{
    ArrayRef, BooleanArray, Float32Array, Float64Array, ListArray, PrimitiveArray, RecordBatch, RecordBatchOptions,
    StringArray, StructArray,
};
use arrow::array::{BooleanBufferBuilder, NullBufferBuilder};
use arrow::buffer::{Buffer, OffsetBuffer, ScalarBuffer};
use arrow::compute::kernels::cast_utils::string_to_datetime;
use arrow::datatypes::{
    DataType, Field, FieldRef, Fields, Int8Type, Int16Type, Int32Type, Int64Type, SchemaRef, TimeUnit,
    TimestampMicrosecondType, TimestampMillisecondType, TimestampNanosecondType, TimestampSecondType, UInt8Type,
    UInt16Type, UInt32Type, UInt64Type,
};
use chrono::{DateTime, TimeZone, Utc};

/// The block is outside what this decoder handles; decode it with arrow-json.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Declined;

type Res<T> = Result<T, Declined>;

/// Nesting deeper than this is left to arrow-json (keeps the recursion bounded).
const MAX_DEPTH: usize = 64;

/// Decodes blocks of JSON lines into batches of one schema.
pub struct FastJsonDecoder {
    schema: SchemaRef,
    /// Which top-level fields hold raw JSON text.
    raw: Vec<bool>,
    root: StructCol,
    scratch: Vec<u8>,
}

impl FastJsonDecoder {
    /// A decoder for `schema`, where the fields flagged in `raw` take a value's JSON text; `None` when the schema has
    /// a type this decoder does not handle.
    pub fn try_new(schema: SchemaRef, raw: Vec<bool>) -> Option<Self> {
        let root = StructCol::new(schema.fields(), Some(&raw))?;
        Some(FastJsonDecoder { schema, raw, root, scratch: Vec::new() })
    }

    /// Decodes `block` (whole lines); `Ok(None)` when it holds no record.
    pub fn decode(&mut self, block: &[u8]) -> Res<Option<RecordBatch>> {
        let result = self.decode_inner(block);
        if result.is_err() {
            // Start the next block from empty columns.
            self.root = StructCol::new(self.schema.fields(), Some(&self.raw)).ok_or(Declined)?;
        }
        result
    }

    fn decode_inner(&mut self, block: &[u8]) -> Res<Option<RecordBatch>> {
        // arrow-json rejects invalid UTF-8 in any string; bytes >= 0x80 outside strings are malformed anyway.
        simdutf8::basic::from_utf8(block).map_err(|_| Declined)?;
        let strict = self.raw.contains(&true);
        let mut p = Parser { b: block, i: 0, strict };
        let mut rows = 0usize;
        loop {
            p.ws();
            if p.i >= block.len() {
                break;
            }
            if block[p.i] != b'{' {
                return Err(Declined);
            }
            let start = p.i;
            p.i += 1;
            self.root.object_body(&mut p, &mut self.scratch, 1)?;
            // The raw JSON columns are read a line at a time: a record over several lines is left to that path.
            if strict && memchr::memchr(b'\n', &block[start..p.i]).is_some() {
                return Err(Declined);
            }
            rows += 1;
            // One record per line: anything but whitespace before the line ends is left to arrow-json.
            while p.i < block.len() && matches!(block[p.i], b' ' | b'\t' | b'\r') {
                p.i += 1;
            }
            if p.i < block.len() && block[p.i] != b'\n' {
                return Err(Declined);
            }
        }
        if rows == 0 {
            return Ok(None);
        }
        let columns = self.root.children.iter_mut().map(Col::finish).collect::<Res<Vec<_>>>()?;
        self.root.nulls = NullBufferBuilder::new(0);
        let options = RecordBatchOptions::new().with_row_count(Some(rows));
        RecordBatch::try_new_with_options(self.schema.clone(), columns, &options).map(Some).map_err(|_| Declined)
    }
}

/// Where a string's text ends: the first `"` or `\` in `s`. Most strings in records are short, so the first 32
/// bytes are searched eight at a time in a word (a call into memchr's vector search costs more than that); memchr
/// takes the rest.
#[inline]
fn quote_or_backslash(s: &[u8]) -> Option<usize> {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    // The lowest set bit marks the first zero byte of `x` (higher bits may be false positives).
    let zero_bytes = |x: u64| x.wrapping_sub(ONES) & !x & HIGHS;
    let mut i = 0;
    while i < 32 {
        let Some(Ok(word)) = s.get(i..i + 8).map(<[u8; 8]>::try_from) else {
            return s[i..].iter().position(|c| *c == b'"' || *c == b'\\').map(|at| i + at);
        };
        let w = u64::from_le_bytes(word);
        let hits = zero_bytes(w ^ (ONES * u64::from(b'"'))) | zero_bytes(w ^ (ONES * u64::from(b'\\')));
        if hits != 0 {
            return Some(i + (hits.trailing_zeros() / 8) as usize);
        }
        i += 8;
    }
    memchr::memchr2(b'"', b'\\', &s[i..]).map(|at| i + at)
}

/// A cursor over a block.
struct Parser<'a> {
    b: &'a [u8],
    i: usize,
    /// Strict JSON (no raw control characters in strings, strict numbers everywhere, no escaped member names): the
    /// raw JSON columns are read with serde_json, which refuses the rest.
    strict: bool,
}

impl<'a> Parser<'a> {
    #[inline]
    fn ws(&mut self) {
        while self.i < self.b.len() && matches!(self.b[self.i], b' ' | b'\t' | b'\n' | b'\r') {
            self.i += 1;
        }
    }

    /// The next byte after whitespace, consumed.
    #[inline]
    fn next_token(&mut self) -> Res<u8> {
        self.ws();
        let c = *self.b.get(self.i).ok_or(Declined)?;
        self.i += 1;
        Ok(c)
    }

    /// Reads a string whose opening quote is consumed, appending its unescaped bytes to `out`.
    fn string_into(&mut self, out: &mut Vec<u8>) -> Res<()> {
        loop {
            let rest = &self.b[self.i..];
            let at = quote_or_backslash(rest).ok_or(Declined)?;
            self.check_text(&rest[..at])?;
            out.extend_from_slice(&rest[..at]);
            self.i += at + 1;
            if rest[at] == b'"' {
                return Ok(());
            }
            self.escape(out)?;
        }
    }

    /// Skips a string whose opening quote is consumed (escapes are still checked).
    fn skip_string(&mut self, scratch: &mut Vec<u8>) -> Res<()> {
        loop {
            let rest = &self.b[self.i..];
            let at = quote_or_backslash(rest).ok_or(Declined)?;
            self.check_text(&rest[..at])?;
            self.i += at + 1;
            if rest[at] == b'"' {
                return Ok(());
            }
            scratch.clear();
            self.escape(scratch)?;
        }
    }

    /// A member name whose opening quote is consumed: borrowed from the block when it has no escapes, otherwise
    /// unescaped into `scratch`.
    fn key<'s>(&mut self, scratch: &'s mut Vec<u8>) -> Res<&'s [u8]>
    where
        'a: 's,
    {
        let rest = &self.b[self.i..];
        let at = quote_or_backslash(rest).ok_or(Declined)?;
        if rest[at] == b'"' {
            self.check_text(&rest[..at])?;
            self.i += at + 1;
            return Ok(&rest[..at]);
        }
        if self.strict {
            return Err(Declined);
        }
        scratch.clear();
        self.string_into(scratch)?;
        Ok(scratch.as_slice())
    }

    /// In strict mode, string text may not hold raw control characters.
    #[inline]
    fn check_text(&self, text: &[u8]) -> Res<()> {
        if self.strict && text.iter().any(|c| *c < 0x20) {
            return Err(Declined);
        }
        Ok(())
    }

    /// Decodes the escape after a backslash.
    fn escape(&mut self, out: &mut Vec<u8>) -> Res<()> {
        let c = *self.b.get(self.i).ok_or(Declined)?;
        self.i += 1;
        let v = match c {
            b'"' => b'"',
            b'\\' => b'\\',
            b'/' => b'/',
            b'b' => 8,
            b'f' => 12,
            b'n' => b'\n',
            b'r' => b'\r',
            b't' => b'\t',
            b'u' => {
                let hex = self.b.get(self.i..self.i + 4).ok_or(Declined)?;
                let mut code = 0u32;
                for h in hex {
                    code = code << 4 | (*h as char).to_digit(16).ok_or(Declined)?;
                }
                self.i += 4;
                // Surrogate pairs are left to arrow-json.
                let ch = char::from_u32(code).ok_or(Declined)?;
                let mut buf = [0u8; 4];
                out.extend_from_slice(ch.encode_utf8(&mut buf).as_bytes());
                return Ok(());
            }
            _ => return Err(Declined),
        };
        out.push(v);
        Ok(())
    }

    /// The bytes of a number whose first byte is at the cursor (the characters arrow-json takes as a number).
    fn number(&mut self) -> &'a [u8] {
        let start = self.i;
        while self.i < self.b.len() && matches!(self.b[self.i], b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E') {
            self.i += 1;
        }
        &self.b[start..self.i]
    }

    /// Consumes `literal` (its first byte already consumed).
    fn literal(&mut self, literal: &[u8]) -> Res<()> {
        let rest = &literal[1..];
        if self.b.get(self.i..self.i + rest.len()) != Some(rest) {
            return Err(Declined);
        }
        self.i += rest.len();
        Ok(())
    }

    /// Skips one value whose first byte `c` is consumed.
    fn skip_value(&mut self, c: u8, scratch: &mut Vec<u8>, depth: usize) -> Res<()> {
        match c {
            b'"' => self.skip_string(scratch),
            b'-' | b'0'..=b'9' => {
                self.i -= 1;
                let s = self.number();
                if self.strict && !strict_number(s, false) {
                    return Err(Declined);
                }
                Ok(())
            }
            b'n' => self.literal(b"null"),
            b't' => self.literal(b"true"),
            b'f' => self.literal(b"false"),
            b'[' => self.list(depth, |p, c, depth| p.skip_value(c, scratch, depth)),
            b'{' => {
                if depth >= MAX_DEPTH {
                    return Err(Declined);
                }
                let mut first = true;
                while self.member(first)? {
                    first = false;
                    self.skip_string(scratch)?;
                    let c = self.member_value()?;
                    self.skip_value(c, scratch, depth + 1)?;
                }
                Ok(())
            }
            _ => Err(Declined),
        }
    }

    /// Moves to the next member of an object: `false` at its end, `true` after the opening quote of the name.
    fn member(&mut self, first: bool) -> Res<bool> {
        match self.next_token()? {
            b'}' => Ok(false),
            b',' if !first => match self.next_token()? {
                b'"' => Ok(true),
                _ => Err(Declined),
            },
            b'"' if first => Ok(true),
            _ => Err(Declined),
        }
    }

    /// Consumes the colon after a member name; the first byte of the value, consumed.
    fn member_value(&mut self) -> Res<u8> {
        if self.next_token()? != b':' {
            return Err(Declined);
        }
        self.next_token()
    }

    /// Walks a list whose `[` is consumed, calling `item` with the first byte of each element.
    fn list(&mut self, depth: usize, mut item: impl FnMut(&mut Self, u8, usize) -> Res<()>) -> Res<()> {
        if depth >= MAX_DEPTH {
            return Err(Declined);
        }
        let mut c = self.next_token()?;
        if c == b']' {
            return Ok(());
        }
        loop {
            item(self, c, depth + 1)?;
            match self.next_token()? {
                b']' => return Ok(()),
                b',' => c = self.next_token()?,
                _ => return Err(Declined),
            }
        }
    }
}

/// Strict JSON number syntax: `-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?`; `integer` allows neither fraction
/// nor exponent.
fn strict_number(s: &[u8], integer: bool) -> bool {
    let mut i = usize::from(s.first() == Some(&b'-'));
    let digits = |i: &mut usize| {
        let start = *i;
        while *i < s.len() && s[*i].is_ascii_digit() {
            *i += 1;
        }
        *i - start
    };
    let n = digits(&mut i);
    if n == 0 || (n > 1 && s[i - n] == b'0') {
        return false;
    }
    if integer {
        return i == s.len();
    }
    if i < s.len() && s[i] == b'.' {
        i += 1;
        if digits(&mut i) == 0 {
            return false;
        }
    }
    if i < s.len() && matches!(s[i], b'e' | b'E') {
        i += 1;
        if i < s.len() && matches!(s[i], b'+' | b'-') {
            i += 1;
        }
        if digits(&mut i) == 0 {
            return false;
        }
    }
    i == s.len()
}

/// How a timestamp column reads strings without an offset.
enum Zone {
    Utc,
    Named(Tz),
}

/// One column being built.
enum Col {
    /// UTF-8 text; `raw` columns take a value's JSON text.
    Str {
        offsets: Vec<i32>,
        values: Vec<u8>,
        nulls: NullBufferBuilder,
        raw: bool,
    },
    Signed {
        values: Vec<i64>,
        nulls: NullBufferBuilder,
        range: (i64, i64),
        data_type: DataType,
    },
    Unsigned {
        values: Vec<u64>,
        nulls: NullBufferBuilder,
        max: u64,
        data_type: DataType,
    },
    F32 {
        values: Vec<f32>,
        nulls: NullBufferBuilder,
    },
    F64 {
        values: Vec<f64>,
        nulls: NullBufferBuilder,
    },
    Bool {
        values: BooleanBufferBuilder,
        nulls: NullBufferBuilder,
    },
    Timestamp {
        values: Vec<i64>,
        nulls: NullBufferBuilder,
        unit: TimeUnit,
        zone: Zone,
        data_type: DataType,
    },
    List {
        offsets: Vec<i32>,
        nulls: NullBufferBuilder,
        child: Box<Col>,
        field: FieldRef,
    },
    Struct(StructCol),
}

/// A struct column (or the record itself).
struct StructCol {
    fields: Fields,
    names: Vec<Vec<u8>>,
    children: Vec<Col>,
    nulls: NullBufferBuilder,
}

impl StructCol {
    fn new(fields: &Fields, raw: Option<&[bool]>) -> Option<Self> {
        if fields.len() > 64 {
            return None;
        }
        let children = fields
            .iter()
            .enumerate()
            .map(|(i, f)| Col::new(f, raw.is_some_and(|r| r.get(i) == Some(&true))))
            .collect::<Option<Vec<_>>>()?;
        Some(StructCol {
            fields: fields.clone(),
            names: fields.iter().map(|f| f.name().as_bytes().to_vec()).collect(),
            children,
            nulls: NullBufferBuilder::new(0),
        })
    }

    /// Reads the members of an object whose `{` is consumed into one row.
    fn object_body(&mut self, p: &mut Parser<'_>, scratch: &mut Vec<u8>, depth: usize) -> Res<()> {
        if depth >= MAX_DEPTH {
            return Err(Declined);
        }
        let mut seen = 0u64;
        // Members usually come in the same order in every record: try the field after the last one first.
        let mut guess = 0usize;
        let mut first = true;
        while p.member(first)? {
            first = false;
            let key = p.key(scratch)?;
            let found = if self.names.get(guess).is_some_and(|n| n.as_slice() == key) {
                Some(guess)
            } else {
                self.names.iter().position(|n| n.as_slice() == key)
            };
            let c = p.member_value()?;
            match found {
                Some(f) => {
                    if seen & (1 << f) != 0 {
                        return Err(Declined);
                    }
                    seen |= 1 << f;
                    self.children[f].value(c, p, scratch, depth + 1)?;
                    guess = f + 1;
                }
                None => p.skip_value(c, scratch, depth + 1)?,
            }
        }
        for (f, child) in self.children.iter_mut().enumerate() {
            if seen & (1 << f) == 0 {
                child.push_null();
            }
        }
        self.nulls.append_non_null();
        Ok(())
    }

    fn push_null(&mut self) {
        for child in &mut self.children {
            child.push_null();
        }
        self.nulls.append_null();
    }
}

impl Col {
    /// `None` for types (or non-nullable fields) this decoder leaves to arrow-json.
    fn new(field: &Field, raw: bool) -> Option<Col> {
        if !field.is_nullable() {
            return None;
        }
        let nulls = NullBufferBuilder::new(0);
        let dt = field.data_type().clone();
        let signed = |lo: i64, hi: i64| Col::Signed {
            values: Vec::new(),
            nulls: NullBufferBuilder::new(0),
            range: (lo, hi),
            data_type: field.data_type().clone(),
        };
        let unsigned = |max: u64| Col::Unsigned {
            values: Vec::new(),
            nulls: NullBufferBuilder::new(0),
            max,
            data_type: field.data_type().clone(),
        };
        Some(match field.data_type() {
            DataType::Utf8 => Col::Str { offsets: vec![0], values: Vec::new(), nulls, raw },
            _ if raw => return None,
            DataType::Int8 => signed(i8::MIN.into(), i8::MAX.into()),
            DataType::Int16 => signed(i16::MIN.into(), i16::MAX.into()),
            DataType::Int32 => signed(i32::MIN.into(), i32::MAX.into()),
            DataType::Int64 => signed(i64::MIN, i64::MAX),
            DataType::UInt8 => unsigned(u8::MAX.into()),
            DataType::UInt16 => unsigned(u16::MAX.into()),
            DataType::UInt32 => unsigned(u32::MAX.into()),
            DataType::UInt64 => unsigned(u64::MAX),
            DataType::Float32 => Col::F32 { values: Vec::new(), nulls },
            DataType::Float64 => Col::F64 { values: Vec::new(), nulls },
            DataType::Boolean => Col::Bool { values: BooleanBufferBuilder::new(0), nulls },
            DataType::Timestamp(unit, tz) => {
                let zone = match tz {
                    None => Zone::Utc,
                    Some(tz) => Zone::Named(tz.parse().ok()?),
                };
                Col::Timestamp { values: Vec::new(), nulls, unit: *unit, zone, data_type: dt }
            }
            DataType::List(item) => {
                let child = Col::new(item, false)?;
                Col::List { offsets: vec![0], nulls, child: Box::new(child), field: item.clone() }
            }
            DataType::Struct(fields) => Col::Struct(StructCol::new(fields, None)?),
            _ => return None,
        })
    }

    fn push_null(&mut self) {
        match self {
            Col::Str { offsets, values, nulls, .. } => {
                offsets.push(values.len() as i32);
                nulls.append_null();
            }
            Col::Signed { values, nulls, .. } | Col::Timestamp { values, nulls, .. } => {
                values.push(0);
                nulls.append_null();
            }
            Col::Unsigned { values, nulls, .. } => {
                values.push(0);
                nulls.append_null();
            }
            Col::F32 { values, nulls } => {
                values.push(0.0);
                nulls.append_null();
            }
            Col::F64 { values, nulls } => {
                values.push(0.0);
                nulls.append_null();
            }
            Col::Bool { values, nulls } => {
                values.append(false);
                nulls.append_null();
            }
            Col::List { offsets, nulls, .. } => {
                offsets.push(offsets.last().copied().unwrap_or(0));
                nulls.append_null();
            }
            Col::Struct(s) => s.push_null(),
        }
    }

    /// Reads one value whose first byte `c` is consumed.
    fn value(&mut self, c: u8, p: &mut Parser<'_>, scratch: &mut Vec<u8>, depth: usize) -> Res<()> {
        if c == b'n' {
            p.literal(b"null")?;
            self.push_null();
            return Ok(());
        }
        match self {
            Col::Str { offsets, values, nulls, raw: false } => {
                if c != b'"' {
                    return Err(Declined);
                }
                p.string_into(values)?;
                let end = i32::try_from(values.len()).map_err(|_| Declined)?;
                offsets.push(end);
                nulls.append_non_null();
            }
            Col::Str { offsets, values, nulls, raw: true } => {
                let start = p.i - 1;
                p.skip_value(c, scratch, depth)?;
                values.extend_from_slice(&p.b[start..p.i]);
                let end = i32::try_from(values.len()).map_err(|_| Declined)?;
                offsets.push(end);
                nulls.append_non_null();
            }
            Col::Signed { values, nulls, range, .. } => {
                p.i -= 1;
                let s = p.number();
                if !strict_number(s, true) {
                    return Err(Declined);
                }
                let v: i64 = lexical_core::parse(s).map_err(|_| Declined)?;
                if v < range.0 || v > range.1 {
                    return Err(Declined);
                }
                values.push(v);
                nulls.append_non_null();
            }
            Col::Unsigned { values, nulls, max, .. } => {
                p.i -= 1;
                let s = p.number();
                if !strict_number(s, true) || s.first() == Some(&b'-') {
                    return Err(Declined);
                }
                let v: u64 = lexical_core::parse(s).map_err(|_| Declined)?;
                if v > *max {
                    return Err(Declined);
                }
                values.push(v);
                nulls.append_non_null();
            }
            Col::F32 { values, nulls } => {
                values.push(float(c, p)?);
                nulls.append_non_null();
            }
            Col::F64 { values, nulls } => {
                values.push(float(c, p)?);
                nulls.append_non_null();
            }
            Col::Bool { values, nulls } => {
                match c {
                    b't' => {
                        p.literal(b"true")?;
                        values.append(true);
                    }
                    b'f' => {
                        p.literal(b"false")?;
                        values.append(false);
                    }
                    _ => return Err(Declined),
                }
                nulls.append_non_null();
            }
            Col::Timestamp { values, nulls, unit, zone, .. } => {
                if c != b'"' {
                    return Err(Declined);
                }
                scratch.clear();
                p.string_into(scratch)?;
                let v = match rfc3339_with_offset(scratch, *unit) {
                    Some(v) => v,
                    None => {
                        let s = std::str::from_utf8(scratch).map_err(|_| Declined)?;
                        match zone {
                            Zone::Utc => in_unit(&string_to_datetime(&Utc, s).map_err(|_| Declined)?, *unit),
                            Zone::Named(tz) => in_unit(&string_to_datetime(tz, s).map_err(|_| Declined)?, *unit),
                        }?
                    }
                };
                values.push(v);
                nulls.append_non_null();
            }
            Col::List { offsets, nulls, child, .. } => {
                if c != b'[' {
                    return Err(Declined);
                }
                let mut n = 0i32;
                p.list(depth, |p, c, depth| {
                    n += 1;
                    child.value(c, p, scratch, depth)
                })?;
                let end = offsets.last().copied().unwrap_or(0).checked_add(n).ok_or(Declined)?;
                offsets.push(end);
                nulls.append_non_null();
            }
            Col::Struct(s) => {
                if c != b'{' {
                    return Err(Declined);
                }
                s.object_body(p, scratch, depth)?;
            }
        }
        Ok(())
    }

    /// The column's array; the column starts empty again.
    fn finish(&mut self) -> Res<ArrayRef> {
        Ok(match self {
            Col::Str { offsets, values, nulls, .. } => {
                let offsets = OffsetBuffer::new(ScalarBuffer::from(std::mem::replace(offsets, vec![0])));
                let values = Buffer::from_vec(std::mem::take(values));
                Arc::new(StringArray::try_new(offsets, values, nulls.finish()).map_err(|_| Declined)?)
            }
            Col::Signed { values, nulls, data_type, .. } => {
                let values = std::mem::take(values);
                let nulls = nulls.finish();
                match data_type {
                    DataType::Int8 => narrow::<Int8Type, _>(values, nulls, |v| v as i8),
                    DataType::Int16 => narrow::<Int16Type, _>(values, nulls, |v| v as i16),
                    DataType::Int32 => narrow::<Int32Type, _>(values, nulls, |v| v as i32),
                    _ => Arc::new(PrimitiveArray::<Int64Type>::new(values.into(), nulls)),
                }
            }
            Col::Unsigned { values, nulls, data_type, .. } => {
                let values = std::mem::take(values);
                let nulls = nulls.finish();
                match data_type {
                    DataType::UInt8 => narrow::<UInt8Type, _>(values, nulls, |v| v as u8),
                    DataType::UInt16 => narrow::<UInt16Type, _>(values, nulls, |v| v as u16),
                    DataType::UInt32 => narrow::<UInt32Type, _>(values, nulls, |v| v as u32),
                    _ => Arc::new(PrimitiveArray::<UInt64Type>::new(values.into(), nulls)),
                }
            }
            Col::F32 { values, nulls } => Arc::new(Float32Array::new(std::mem::take(values).into(), nulls.finish())),
            Col::F64 { values, nulls } => Arc::new(Float64Array::new(std::mem::take(values).into(), nulls.finish())),
            Col::Bool { values, nulls } => Arc::new(BooleanArray::new(values.finish(), nulls.finish())),
            Col::Timestamp { values, nulls, unit, data_type, .. } => {
                let values = ScalarBuffer::from(std::mem::take(values));
                let nulls = nulls.finish();
                let dt = data_type.clone();
                match unit {
                    TimeUnit::Second => timestamps::<TimestampSecondType>(values, nulls, dt),
                    TimeUnit::Millisecond => timestamps::<TimestampMillisecondType>(values, nulls, dt),
                    TimeUnit::Microsecond => timestamps::<TimestampMicrosecondType>(values, nulls, dt),
                    TimeUnit::Nanosecond => timestamps::<TimestampNanosecondType>(values, nulls, dt),
                }?
            }
            Col::List { offsets, nulls, child, field } => {
                let offsets = OffsetBuffer::new(ScalarBuffer::from(std::mem::replace(offsets, vec![0])));
                let values = child.finish()?;
                Arc::new(ListArray::try_new(field.clone(), offsets, values, nulls.finish()).map_err(|_| Declined)?)
            }
            Col::Struct(s) => {
                let len = s.nulls.len();
                let nulls = s.nulls.finish();
                let children = s.children.iter_mut().map(Col::finish).collect::<Res<Vec<_>>>()?;
                let array = StructArray::try_new_with_length(s.fields.clone(), children, nulls, len);
                Arc::new(array.map_err(|_| Declined)?)
            }
        })
    }
}

/// A float column's value: strict JSON number syntax, parsed by arrow-json's own parser (lexical, correctly rounded).
fn float<T: lexical_core::FromLexical>(c: u8, p: &mut Parser<'_>) -> Res<T> {
    if !matches!(c, b'-' | b'0'..=b'9') {
        return Err(Declined);
    }
    p.i -= 1;
    let s = p.number();
    if !strict_number(s, false) {
        return Err(Declined);
    }
    lexical_core::parse(s).map_err(|_| Declined)
}

fn in_unit<Z: TimeZone>(t: &DateTime<Z>, unit: TimeUnit) -> Res<i64> {
    Ok(match unit {
        TimeUnit::Second => t.timestamp(),
        TimeUnit::Millisecond => t.timestamp_millis(),
        TimeUnit::Microsecond => t.timestamp_micros(),
        TimeUnit::Nanosecond => t.timestamp_nanos_opt().ok_or(Declined)?,
    })
}

/// `YYYY-MM-DDTHH:MM:SS[.f{1,9}](Z|±HH:MM)` in `unit`, without chrono: most event streams stamp every record this
/// way (EventBridge's `time`), and a string with its own offset is the same instant in any column zone. Anything
/// else, or out of range, is `None` and goes to arrow's parser.
fn rfc3339_with_offset(s: &[u8], unit: TimeUnit) -> Option<i64> {
    fn digits(s: &[u8]) -> Option<i64> {
        s.iter().try_fold(0i64, |n, c| c.is_ascii_digit().then(|| n * 10 + i64::from(c - b'0')))
    }
    if s.len() < 20 || s[4] != b'-' || s[7] != b'-' || s[10] != b'T' || s[13] != b':' || s[16] != b':' {
        return None;
    }
    let (year, month, day) = (digits(&s[0..4])?, digits(&s[5..7])?, digits(&s[8..10])?);
    let (hour, minute, second) = (digits(&s[11..13])?, digits(&s[14..16])?, digits(&s[17..19])?);
    let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
    let month_days = [31, if leap { 29 } else { 28 }, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31];
    if !(1..=12).contains(&month) || day < 1 || day > month_days[(month - 1) as usize] {
        return None;
    }
    if hour > 23 || minute > 59 || second > 59 {
        return None;
    }
    let mut rest = &s[19..];
    let mut nanos = 0i64;
    if let Some(fraction) = rest.strip_prefix(b".") {
        let n = fraction.iter().take_while(|c| c.is_ascii_digit()).count();
        if n == 0 || n > 9 {
            return None;
        }
        nanos = digits(&fraction[..n])? * 10i64.pow(9 - n as u32);
        rest = &fraction[n..];
    }
    let offset = match rest {
        b"Z" => 0,
        [sign @ (b'+' | b'-'), h1, h2, b':', m1, m2] => {
            let (h, m) = (digits(&[*h1, *h2])?, digits(&[*m1, *m2])?);
            if h > 23 || m > 59 {
                return None;
            }
            let offset = h * 3600 + m * 60;
            if *sign == b'-' { -offset } else { offset }
        }
        _ => return None,
    };
    // Days since 1970-01-01 in the proleptic Gregorian calendar (H. Hinnant's `days_from_civil`).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * ((month + 9) % 12) + 2) / 5 + day - 1;
    let days = era * 146_097 + yoe * 365 + yoe / 4 - yoe / 100 + doy - 719_468;
    let secs = days * 86_400 + hour * 3600 + minute * 60 + second - offset;
    match unit {
        TimeUnit::Second => Some(secs),
        TimeUnit::Millisecond => Some(secs * 1000 + nanos / 1_000_000),
        TimeUnit::Microsecond => Some(secs * 1_000_000 + nanos / 1000),
        TimeUnit::Nanosecond => secs.checked_mul(1_000_000_000)?.checked_add(nanos),
    }
}

fn timestamps<T: arrow::datatypes::ArrowTimestampType>(
    values: ScalarBuffer<i64>,
    nulls: Option<arrow::buffer::NullBuffer>,
    data_type: DataType,
) -> Res<ArrayRef> {
    let array = PrimitiveArray::<T>::try_new(values, nulls).map_err(|_| Declined)?;
    Ok(Arc::new(array.with_data_type(data_type)))
}

fn narrow<T: arrow::datatypes::ArrowPrimitiveType, V>(
    values: Vec<V>,
    nulls: Option<arrow::buffer::NullBuffer>,
    f: impl Fn(V) -> T::Native,
) -> ArrayRef {
    Arc::new(PrimitiveArray::<T>::new(values.into_iter().map(f).collect::<Vec<_>>().into(), nulls))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The word-at-a-time search finds the first quote or backslash wherever it is, or none.
    #[test]
    fn quote_or_backslash_finds_the_first() {
        for len in 0..80 {
            for at in 0..=len {
                for (first, second) in [(b'"', b'\\'), (b'\\', b'"'), (b'"', b'"')] {
                    let mut s: Vec<u8> = (0..len).map(|i| b"a\x80\x7f\x00!#[]\xff"[i % 9]).collect();
                    if at < len {
                        s[at] = first;
                        if at + 1 < len {
                            s[at + 1] = second;
                        }
                    }
                    let expected = s.iter().position(|c| *c == b'"' || *c == b'\\');
                    assert_eq!(quote_or_backslash(&s), expected, "{s:?}");
                }
            }
        }
    }

    /// The chrono-free timestamp path gives what arrow's parser gives, and leaves it what it does not handle.
    #[test]
    fn rfc3339_fast_path_agrees_with_arrow() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let units = [TimeUnit::Second, TimeUnit::Millisecond, TimeUnit::Microsecond, TimeUnit::Nanosecond];
        let mut fast = 0;
        for i in 0..50_000 {
            let year = [1969, 1970, 2000, 2024, 2100, 1900, 1600, 2262, 9999, 0][next(10) as usize];
            let fraction = match next(4) {
                0 => String::new(),
                _ => format!(".{}", &"123456789012"[..1 + next(11) as usize]),
            };
            let offset = ["Z", "+00:00", "-05:30", "+14:00", "z", "+0100", "-23:59", ""][next(8) as usize];
            let s = format!(
                "{year:04}-{:02}-{:02}{}{:02}:{:02}:{:02}{fraction}{offset}",
                next(14),
                next(32),
                if next(10) == 0 { ' ' } else { 'T' },
                next(25),
                next(61),
                next(62),
            );
            let unit = units[i % 4];
            let expected = string_to_datetime(&Utc, &s).ok().and_then(|t| in_unit(&t, unit).ok());
            if let Some(v) = rfc3339_with_offset(s.as_bytes(), unit) {
                fast += 1;
                assert_eq!(Some(v), expected, "{s} in {unit:?}");
            }
        }
        assert!(fast > 5_000, "the fast path took only {fast} strings");
        assert_eq!(rfc3339_with_offset(b"2026-01-01T00:32:33.260Z", TimeUnit::Millisecond), Some(1_767_227_553_260));
    }
}
