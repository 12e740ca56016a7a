//! Pointing errors found in logical plans back at the SQL text: where words, statements and select items are.

use datafusion::sql::sqlparser::ast::{self as sql, SetExpr, Spanned};
use datafusion::sql::sqlparser::dialect::GenericDialect;
use datafusion::sql::sqlparser::tokenizer::{Token, Tokenizer};

use crate::error::Location;

/// Locations of words and statements in the text, to point errors found in logical plans back at the SQL.
pub(super) struct WordIndex {
    pub(super) words: Vec<(String, Location)>,
    pub(super) statements: Vec<Location>,
}

impl WordIndex {
    pub(super) fn new(sql: &str) -> Self {
        let tokens: Vec<_> = Tokenizer::new(&GenericDialect {}, sql)
            .tokenize_with_location()
            .unwrap_or_default()
            .into_iter()
            .filter(|t| !matches!(t.token, Token::Whitespace(_)))
            .collect();
        let words = tokens
            .iter()
            .filter_map(|t| match &t.token {
                Token::Word(w) => Location::from_sql(t.span.start).map(|l| (w.value.to_ascii_uppercase(), l)),
                _ => None,
            })
            .collect();
        // Statement starts: the first token after each run of semicolons (the parser skips empty statements).
        let mut statements = Vec::new();
        let mut at_start = true;
        for t in &tokens {
            if t.token == Token::SemiColon || t.token == Token::EOF {
                at_start = true;
            } else if at_start {
                at_start = false;
                if let Some(l) = Location::from_sql(t.span.start) {
                    statements.push(l);
                }
            }
        }
        WordIndex { words, statements }
    }

    /// First occurrence of `word` at or after `from`.
    pub(super) fn find(&self, word: &str, from: Option<Location>) -> Option<Location> {
        let from = from.unwrap_or(Location { line: 0, column: 0 });
        self.words.iter().find(|(w, l)| *l >= from && w.eq_ignore_ascii_case(word)).map(|(_, l)| *l)
    }
}

/// Start of each SELECT item of the query's top-level SELECT.
pub(super) fn select_item_locations(query: &sql::Query) -> Vec<Option<Location>> {
    match query.body.as_ref() {
        SetExpr::Select(s) => s.projection.iter().map(|p| Location::from_span(p.span())).collect(),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use datafusion::sql::sqlparser::parser::Parser;

    use super::*;

    #[test]
    fn words_and_statements_are_found_by_position() {
        let sql = "SET a = '1';\nINSERT INTO t\nSELECT id, UPPER(name) FROM s WHERE id > 0;\nSELECT id FROM u;";
        let w = WordIndex::new(sql);
        assert_eq!(w.statements.len(), 3);
        assert_eq!(w.statements[1], Location { line: 2, column: 1 });
        assert_eq!(w.find("select", None), Some(Location { line: 3, column: 1 }));
        assert_eq!(w.find("id", Some(Location { line: 4, column: 1 })), Some(Location { line: 4, column: 8 }));
        assert_eq!(w.find("missing", None), None);
    }

    #[test]
    fn select_items_are_located() {
        let sql = "SELECT id,\n  name AS n FROM s";
        let stmt = Parser::parse_sql(&GenericDialect {}, sql).unwrap().remove(0);
        let sql::Statement::Query(q) = stmt else { panic!("a query") };
        let locs = select_item_locations(&q);
        assert_eq!(locs, vec![Some(Location { line: 1, column: 8 }), Some(Location { line: 2, column: 3 })]);
    }
}
