//! SQL golden tests: every `sql/tests/*.sql` runs through the planner and the runtime, and what its sinks write is
//! compared with `<name>.expected`. A case may instead expect an error (`-- error: <text>` at the top), or a number
//! of dead-letter records (`-- dead_letters: <n>`).
//!
//! Sinks in the cases write JSON lines to `${OUT}/<sink>`; inputs live in `${DIR}` (sql/tests). The expected file has
//! one section per sink, `# sink <name>`, followed by the rows as JSON objects, in any order.
//! `NAGARE_BLESS=1` rewrites the expected files from the actual output (review the diff before committing).
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use common::{files_with, read_json_rows, repo_root, run_sql};

struct Case {
    name: String,
    sql: String,
    expected_error: Option<String>,
    dead_letters: Option<usize>,
    expected: PathBuf,
}

fn cases(dir: &Path) -> Vec<Case> {
    let mut out = Vec::new();
    for f in files_with(dir, &[".sql"]) {
        let sql = std::fs::read_to_string(&f).unwrap();
        let mut expected_error = None;
        let mut dead_letters = None;
        for line in sql.lines().take_while(|l| l.starts_with("--")) {
            if let Some(e) = line.strip_prefix("-- error:") {
                expected_error = Some(e.trim().to_string());
            }
            if let Some(n) = line.strip_prefix("-- dead_letters:") {
                dead_letters = Some(n.trim().parse().unwrap());
            }
        }
        let name = f.strip_prefix(dir).unwrap().to_string_lossy().trim_end_matches(".sql").to_string();
        out.push(Case { name, sql, expected_error, dead_letters, expected: f.with_extension("expected") });
    }
    out
}

fn canonical(rows: Vec<serde_json::Value>) -> Vec<String> {
    let mut v: Vec<String> = rows.into_iter().map(|r| r.to_string()).collect();
    v.sort();
    v
}

fn parse_expected(path: &Path) -> BTreeMap<String, Vec<String>> {
    let mut sections: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let Ok(text) = std::fs::read_to_string(path) else { return sections };
    let mut current = None;
    for line in text.lines() {
        let line = line.trim();
        if let Some(s) = line.strip_prefix("# sink ") {
            current = Some(s.trim().to_string());
            sections.entry(s.trim().to_string()).or_default();
        } else if !line.is_empty() && !line.starts_with('#') {
            let v: serde_json::Value =
                serde_json::from_str(line).unwrap_or_else(|e| panic!("{}: bad JSON {line}: {e}", path.display()));
            sections.get_mut(current.as_ref().expect("row before '# sink'")).unwrap().push(v.to_string());
        }
    }
    for rows in sections.values_mut() {
        rows.sort();
    }
    sections
}

async fn run_case(case: &Case, dir: &Path) -> Result<(), String> {
    let out = tempfile::tempdir().unwrap();
    let vars = [("DIR", dir.to_str().unwrap()), ("OUT", out.path().to_str().unwrap())];
    let result = run_sql(&case.sql, &vars).await;
    match (&case.expected_error, result) {
        (Some(want), Err(e)) => {
            let got = e.to_string();
            if got.contains(want.as_str()) {
                Ok(())
            } else {
                Err(format!("expected error containing\n  {want}\ngot\n  {got}"))
            }
        }
        (Some(want), Ok(_)) => Err(format!("expected error containing '{want}', but the pipeline ran")),
        (None, Err(e)) => Err(format!("failed: {e}")),
        (None, Ok(_)) => {
            let mut actual: BTreeMap<String, Vec<String>> = BTreeMap::new();
            let Ok(entries) = std::fs::read_dir(out.path()) else { return Err("no output".into()) };
            for e in entries {
                let p = e.unwrap().path();
                if p.is_dir() && !p.file_name().unwrap().to_string_lossy().starts_with("dead") {
                    actual.insert(p.file_name().unwrap().to_string_lossy().to_string(), canonical(read_json_rows(&p)));
                }
            }
            if let Some(n) = case.dead_letters {
                let got = read_json_rows(&out.path().join("dead_letters")).len();
                if got != n {
                    return Err(format!("expected {n} dead-letter records, got {got}"));
                }
            }
            if std::env::var_os("NAGARE_BLESS").is_some() {
                let mut text = String::new();
                for (sink, rows) in &actual {
                    text.push_str(&format!("# sink {sink}\n"));
                    for r in rows {
                        text.push_str(r);
                        text.push('\n');
                    }
                }
                std::fs::write(&case.expected, text).unwrap();
                return Ok(());
            }
            let expected = parse_expected(&case.expected);
            if expected.is_empty() {
                return Err(format!("{} is missing", case.expected.display()));
            }
            if actual != expected {
                let mut msg = String::new();
                for sink in expected.keys().chain(actual.keys()).collect::<std::collections::BTreeSet<_>>() {
                    let (e, a) = (
                        expected.get(sink).cloned().unwrap_or_default(),
                        actual.get(sink).cloned().unwrap_or_default(),
                    );
                    if e != a {
                        msg.push_str(&format!("sink {sink}:\n"));
                        for r in e.iter().filter(|r| !a.contains(r)) {
                            msg.push_str(&format!("  missing    {r}\n"));
                        }
                        for r in a.iter().filter(|r| !e.contains(r)) {
                            msg.push_str(&format!("  unexpected {r}\n"));
                        }
                    }
                }
                return Err(msg);
            }
            Ok(())
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_cases() {
    let dir = repo_root().join("sql/tests");
    let cases = cases(&dir);
    assert!(cases.len() >= 20, "expected the SQL cases under {}", dir.display());
    let mut failures = Vec::new();
    for case in &cases {
        if let Err(e) = run_case(case, &dir).await {
            failures.push(format!("--- {}\n{e}", case.name));
        }
    }
    assert!(failures.is_empty(), "{} of {} SQL cases failed:\n{}", failures.len(), cases.len(), failures.join("\n"));
}
