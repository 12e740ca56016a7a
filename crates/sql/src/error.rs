//! Plan-time errors: what is wrong with a pipeline, and where in the SQL text.

use std::fmt;

/// A position in the SQL text, 1-based.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub struct Location {
    /// Line, from 1.
    pub line: u64,
    /// Column in characters, from 1.
    pub column: u64,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.line, self.column)
    }
}

impl Location {
    /// Converts a sqlparser/DataFusion location; line 0 means "unknown".
    pub fn from_sql(loc: datafusion::sql::sqlparser::tokenizer::Location) -> Option<Location> {
        (loc.line > 0).then_some(Location { line: loc.line, column: loc.column })
    }

    /// The start of a span, if the span is known.
    pub fn from_span(span: datafusion::sql::sqlparser::tokenizer::Span) -> Option<Location> {
        Location::from_sql(span.start)
    }
}

/// What kind of mistake a plan error reports, so tools can group them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlanErrorKind {
    /// The text does not parse.
    Syntax,
    /// A table, column, connector, function or setting that does not exist.
    Unknown,
    /// An option or setting with a value of the wrong type or out of range.
    InvalidValue,
    /// Types that do not fit together.
    TypeMismatch,
    /// Valid SQL that nagare does not run (yet), or cannot run on an unbounded stream.
    Unsupported,
    /// Something the environment refused at plan time (a path that does not exist, ...).
    Environment,
    /// A bug in nagare.
    Internal,
}

/// A pipeline that cannot run, with the position of the offending SQL when known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanError {
    /// Category.
    pub kind: PlanErrorKind,
    /// What is wrong, in one sentence.
    pub message: String,
    /// Where in the SQL text.
    pub location: Option<Location>,
    /// What to do about it, when there is an obvious fix.
    pub hint: Option<String>,
}

impl std::error::Error for PlanError {}

impl fmt::Display for PlanError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(loc) = self.location {
            write!(f, "{loc}: ")?;
        }
        if self.kind == PlanErrorKind::Internal {
            write!(f, "internal error (this is a bug in nagare): ")?;
        }
        write!(f, "{}", self.message)?;
        if let Some(hint) = &self.hint {
            write!(f, " (hint: {hint})")?;
        }
        Ok(())
    }
}

impl PlanError {
    /// A new error of `kind`.
    pub fn new(kind: PlanErrorKind, message: impl Into<String>) -> Self {
        PlanError { kind, message: message.into(), location: None, hint: None }
    }

    /// Attaches a location unless one is already set (the innermost location wins).
    pub fn at(mut self, location: Option<Location>) -> Self {
        if self.location.is_none() {
            self.location = location;
        }
        self
    }

    /// Attaches a hint.
    pub fn hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    /// Shorthand for [`PlanErrorKind::Unsupported`].
    pub fn unsupported(message: impl Into<String>) -> Self {
        Self::new(PlanErrorKind::Unsupported, message)
    }

    /// Shorthand for [`PlanErrorKind::Unknown`].
    pub fn unknown(message: impl Into<String>) -> Self {
        Self::new(PlanErrorKind::Unknown, message)
    }

    /// Shorthand for [`PlanErrorKind::InvalidValue`].
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(PlanErrorKind::InvalidValue, message)
    }

    /// Shorthand for [`PlanErrorKind::Internal`].
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(PlanErrorKind::Internal, message)
    }

    /// Converts a DataFusion planning error, keeping its diagnostic position when it has one.
    pub fn from_datafusion(err: datafusion::error::DataFusionError) -> Self {
        use datafusion::error::DataFusionError as E;
        let location = err
            .diagnostic()
            .and_then(|d| d.span)
            .and_then(|s| (s.start.line > 0).then_some(Location { line: s.start.line, column: s.start.column }));
        let root = err.find_root();
        let kind = match root {
            E::SQL(..) => PlanErrorKind::Syntax,
            E::SchemaError(..) => PlanErrorKind::Unknown,
            E::NotImplemented(_) => PlanErrorKind::Unsupported,
            E::Internal(_) => PlanErrorKind::Internal,
            _ => PlanErrorKind::InvalidValue,
        };
        let message = clean_datafusion_message(&root.to_string());
        let kind = if message.contains("No function matches")
            || message.contains("Cannot coerce")
            || message.contains("Cannot infer common")
            || message.contains("does not support") && message.contains("type")
        {
            PlanErrorKind::TypeMismatch
        } else {
            kind
        };
        PlanError { kind, message, location, hint: None }
    }

    /// Converts a sqlparser error, taking the position out of its message.
    pub fn from_parser(err: &datafusion::sql::sqlparser::parser::ParserError) -> Self {
        let text = err.to_string();
        let text = text.strip_prefix("sql parser error: ").unwrap_or(&text).to_string();
        let (message, location) = split_parser_location(&text);
        PlanError { kind: PlanErrorKind::Syntax, message, location, hint: None }
    }
}

/// sqlparser puts positions at the end of messages: "... at Line: 3, Column: 15".
fn split_parser_location(text: &str) -> (String, Option<Location>) {
    if let Some(idx) = text.rfind(" at Line: ") {
        let tail = &text[idx + " at Line: ".len()..];
        let mut parts = tail.split(", Column: ");
        if let (Some(l), Some(c)) = (parts.next(), parts.next())
            && let (Ok(line), Ok(column)) = (l.trim().parse(), c.trim().parse())
        {
            return (text[..idx].to_string(), Some(Location { line, column }));
        }
    }
    (text.to_string(), None)
}

fn clean_datafusion_message(text: &str) -> String {
    let mut s = text;
    for prefix in [
        "Error during planning: ",
        "Schema error: ",
        "This feature is not implemented: ",
        "SQL error: ",
        "Internal error: ",
    ] {
        if let Some(rest) = s.strip_prefix(prefix) {
            s = rest;
        }
    }
    let s = s.strip_prefix("ParserError(\"").and_then(|r| r.strip_suffix("\")")).unwrap_or(s);
    // Tables live in DataFusion's default catalog; users never wrote that part.
    s.trim().replace("datafusion.public.", "")
}

/// Result of planning.
pub type Result<T, E = PlanError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parser_location_is_extracted() {
        let (m, l) = split_parser_location("Expected: ), found: x at Line: 3, Column: 15");
        assert_eq!(m, "Expected: ), found: x");
        assert_eq!(l, Some(Location { line: 3, column: 15 }));
    }

    #[test]
    fn display_puts_position_first() {
        let e = PlanError::unknown("unknown option 'foo'").at(Some(Location { line: 2, column: 7 })).hint("see docs");
        assert_eq!(e.to_string(), "2:7: unknown option 'foo' (hint: see docs)");
    }
}
