//! Streaming clauses that sqlparser does not know, taken out of the text before parsing.
//!
//! `WATERMARK FOR col AS expr` inside a `CREATE TABLE` column list is blanked (replaced by spaces, newlines kept) so
//! that every other token keeps its line and column, and is returned separately with its position.

use datafusion::sql::sqlparser::dialect::GenericDialect;
use datafusion::sql::sqlparser::tokenizer::{Token, TokenWithSpan, Tokenizer};

use crate::error::{Location, PlanError, Result};

/// A `WATERMARK FOR` clause found in the text.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct WatermarkClause {
    /// Index of the statement (split at `;`) the clause belongs to.
    pub statement: usize,
    /// The event-time column, as written (unquoted).
    pub column: String,
    /// The watermark expression's text.
    pub expr: String,
    /// Where `WATERMARK` is.
    pub location: Location,
    /// Where the expression starts.
    pub expr_location: Location,
}

/// The text with streaming clauses blanked, and the clauses.
#[derive(Debug, Clone)]
pub struct Preprocessed {
    /// SQL that sqlparser accepts, positions unchanged.
    pub sql: String,
    /// Watermark clauses in text order.
    pub watermarks: Vec<WatermarkClause>,
}

/// Finds and blanks `WATERMARK FOR` clauses.
pub fn preprocess(sql: &str) -> Result<Preprocessed> {
    let tokens = Tokenizer::new(&GenericDialect {}, sql).tokenize_with_location().map_err(|e| {
        let (message, location) = (e.message.clone(), Location::from_sql(e.location));
        PlanError::new(crate::error::PlanErrorKind::Syntax, message).at(location)
    })?;
    let tokens: Vec<&TokenWithSpan> = tokens.iter().filter(|t| !matches!(t.token, Token::Whitespace(_))).collect();
    let offsets = LineOffsets::new(sql);
    let mut blank: Vec<(usize, usize)> = Vec::new();
    let mut watermarks = Vec::new();

    let mut statement = 0usize;
    let mut stmt_start = 0usize;
    let mut i = 0usize;
    while i < tokens.len() {
        match &tokens[i].token {
            Token::SemiColon => {
                statement += 1;
                stmt_start = i + 1;
                i += 1;
                continue;
            }
            Token::LParen if is_create_table(&tokens[stmt_start..i]) && depth_before(&tokens[stmt_start..i]) == 0 => {
                // Column list of CREATE TABLE: walk its top-level items.
                let mut depth = 1usize;
                let mut j = i + 1;
                let mut item_start = j;
                let mut prev_comma: Option<usize> = None;
                while j < tokens.len() && depth > 0 {
                    match &tokens[j].token {
                        Token::LParen => depth += 1,
                        Token::RParen => depth -= 1,
                        Token::Comma if depth == 1 => {}
                        _ => {}
                    }
                    let at_item_end = depth == 0 || (depth == 1 && tokens[j].token == Token::Comma);
                    if at_item_end {
                        if let Some(clause) = watermark_clause(&tokens[item_start..j], sql, &offsets, statement)? {
                            let start = offsets.byte(tokens[item_start].span.start);
                            let end = offsets.byte(tokens[j].span.start);
                            // Remove one neighbouring comma so the list stays well-formed.
                            if let Some(c) = prev_comma {
                                blank.push((offsets.byte(tokens[c].span.start), start));
                            } else if tokens[j].token == Token::Comma {
                                blank.push((end, offsets.byte(tokens[j].span.end)));
                            }
                            blank.push((start, end));
                            watermarks.push(clause);
                        }
                        if depth == 1 {
                            prev_comma = Some(j);
                            item_start = j + 1;
                        }
                    }
                    j += 1;
                }
                i = j;
                continue;
            }
            _ => {}
        }
        i += 1;
    }

    let mut bytes = sql.as_bytes().to_vec();
    for (start, end) in blank {
        for b in &mut bytes[start..end] {
            if *b != b'\n' && *b != b'\r' {
                *b = b' ';
            }
        }
    }
    // Only ASCII bytes inside blanked ranges could be multi-byte; blanking whole characters keeps UTF-8 valid
    // because ranges start and end at token boundaries.
    let sql = String::from_utf8(bytes).map_err(|_| PlanError::internal("blanking broke UTF-8"))?;
    Ok(Preprocessed { sql, watermarks })
}

fn is_create_table(tokens: &[&TokenWithSpan]) -> bool {
    let words: Vec<String> = tokens
        .iter()
        .filter_map(|t| match &t.token {
            Token::Word(w) if w.quote_style.is_none() => Some(w.value.to_ascii_uppercase()),
            _ => None,
        })
        .collect();
    words.first().map(String::as_str) == Some("CREATE") && words.iter().any(|w| w == "TABLE")
}

fn depth_before(tokens: &[&TokenWithSpan]) -> i64 {
    tokens.iter().fold(0i64, |d, t| match t.token {
        Token::LParen => d + 1,
        Token::RParen => d - 1,
        _ => d,
    })
}

fn watermark_clause(
    item: &[&TokenWithSpan],
    sql: &str,
    offsets: &LineOffsets,
    statement: usize,
) -> Result<Option<WatermarkClause>> {
    let is_word = |t: &TokenWithSpan, w: &str| matches!(&t.token, Token::Word(x) if x.quote_style.is_none() && x.value.eq_ignore_ascii_case(w));
    if item.len() < 2 || !is_word(item[0], "WATERMARK") || !is_word(item[1], "FOR") {
        return Ok(None);
    }
    let location = Location::from_sql(item[0].span.start).unwrap_or(Location { line: 1, column: 1 });
    let syntax = |msg: &str| {
        PlanError::new(crate::error::PlanErrorKind::Syntax, msg.to_string())
            .at(Some(location))
            .hint("write WATERMARK FOR <column> AS <column> - INTERVAL '5' SECOND")
    };
    let column = match item.get(2).map(|t| &t.token) {
        Some(Token::Word(w)) => w.value.clone(),
        _ => return Err(syntax("WATERMARK FOR needs a column name")),
    };
    if item.len() < 5 || !is_word(item[3], "AS") {
        return Err(syntax("WATERMARK FOR <column> needs AS <expression>"));
    }
    let start = offsets.byte(item[4].span.start);
    let end = offsets.byte(item[item.len() - 1].span.end);
    let expr = sql[start..end].to_string();
    let expr_location = Location::from_sql(item[4].span.start).unwrap_or(location);
    Ok(Some(WatermarkClause { statement, column, expr, location, expr_location }))
}

/// Maps tokenizer locations (line, character column) to byte offsets.
struct LineOffsets<'a> {
    sql: &'a str,
    starts: Vec<usize>,
}

impl<'a> LineOffsets<'a> {
    fn new(sql: &'a str) -> Self {
        let mut starts = vec![0];
        starts.extend(sql.match_indices('\n').map(|(i, _)| i + 1));
        LineOffsets { sql, starts }
    }

    fn byte(&self, loc: datafusion::sql::sqlparser::tokenizer::Location) -> usize {
        let line = (loc.line.max(1) - 1) as usize;
        let Some(&start) = self.starts.get(line) else { return self.sql.len() };
        let col = loc.column.max(1) as usize - 1;
        self.sql[start..].char_indices().nth(col).map(|(i, _)| start + i).unwrap_or(self.sql.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blanks_watermark_and_keeps_positions() {
        let sql = "CREATE TABLE e (\n  id TEXT,\n  time TIMESTAMP,\n  WATERMARK FOR time AS time - INTERVAL '5' SECOND\n) WITH (connector = 'x');\nSELECT 1;";
        let p = preprocess(sql).unwrap();
        assert_eq!(p.watermarks.len(), 1);
        let w = &p.watermarks[0];
        assert_eq!(w.column, "time");
        assert_eq!(w.expr, "time - INTERVAL '5' SECOND");
        assert_eq!(w.location, Location { line: 4, column: 3 });
        assert_eq!(w.statement, 0);
        assert_eq!(p.sql.len(), sql.len());
        assert!(!p.sql.contains("WATERMARK"));
        assert!(!p.sql.contains("TIMESTAMP,"), "trailing comma removed: {}", p.sql);
        assert_eq!(p.sql.lines().count(), sql.lines().count());
    }

    #[test]
    fn watermark_first_in_list_and_nested_parens() {
        let sql = "CREATE TABLE e (WATERMARK FOR t AS t - INTERVAL '1' SECOND, t TIMESTAMP, d STRUCT<a DECIMAL(10, 2)>) WITH (c = 'x')";
        let p = preprocess(sql).unwrap();
        assert_eq!(p.watermarks[0].expr, "t - INTERVAL '1' SECOND");
        assert!(p.sql.trim_start().starts_with("CREATE TABLE e ("));
        assert!(!p.sql.contains(", t TIMESTAMP"), "{}", p.sql);
    }

    #[test]
    fn incomplete_clause_is_a_syntax_error() {
        let e = preprocess("CREATE TABLE e (t TIMESTAMP, WATERMARK FOR t) WITH (c='x')").unwrap_err();
        assert!(e.to_string().contains("needs AS"), "{e}");
        assert_eq!(e.location, Some(Location { line: 1, column: 30 }));
    }

    #[test]
    fn leaves_other_statements_alone() {
        let sql = "INSERT INTO s SELECT watermark FROM t";
        assert_eq!(preprocess(sql).unwrap().sql, sql);
    }
}
