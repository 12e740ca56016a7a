//! SQL text to a [`Pipeline`]: statements are parsed with sqlparser, queries planned and type-checked by DataFusion,
//! and the resulting logical plans translated into a dataflow graph of streaming operators.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::Duration;

use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
use datafusion::common::{DFSchema, DFSchemaRef, ScalarValue, TableReference};
use datafusion::datasource::empty::EmptyTable;
use datafusion::execution::SessionStateBuilder;
use datafusion::execution::context::{ExecutionProps, SessionConfig, SessionContext};
use datafusion::logical_expr::ExprSchemable;
use datafusion::logical_expr::expr::WindowFunction;
use datafusion::logical_expr::physical_planning_context::PhysicalPlanningContext;
use datafusion::logical_expr::utils::conjunction;
use datafusion::logical_expr::utils::split_conjunction;
use datafusion::logical_expr::{Aggregate, BinaryExpr, Distinct, Expr, LogicalPlan, Operator, Projection, SortExpr};
use datafusion::optimizer::optimize_projections::OptimizeProjections;
use datafusion::physical_expr::aggregate::LoweredAggregateBuilder;
use datafusion::physical_expr::{PhysicalExpr, create_physical_expr};
use datafusion::sql::parser::Statement as DFStatement;
use datafusion::sql::sqlparser::ast::{
    self as sql, Expr as SqlExpr, FunctionArg, FunctionArgExpr, FunctionArgumentList, FunctionArguments, Ident,
    ObjectName, SetExpr, Spanned, Statement, TableObject, Value, VisitMut, VisitorMut,
};
use datafusion::sql::sqlparser::dialect::GenericDialect;
use datafusion::sql::sqlparser::parser::Parser;
use datafusion::sql::sqlparser::tokenizer::{Token, Tokenizer};

use crate::catalog::{ConnectorCatalog, TableDef, TableRole, Variables, normalize_object_name};
use crate::error::{Location, PlanError, PlanErrorKind, Result};
use crate::graph::{
    AggregateSpec, CalcSpec, CollapseSpec, DataflowGraph, DedupScope, DedupSpec, Edge, Keep, LateRowPolicy, Node,
    NodeId, OperatorSpec, Partitioning, Pipeline, Settings, SinkSpec, SourceSpec, WatermarkSpec, WindowAggregateSpec,
};
use crate::options::{OptionKind, OptionValue, closest, parse_option_value};
use crate::preprocess::{WatermarkClause, preprocess};
use crate::window::{WindowKind, as_window_call, contains_window_call, split_bound_function, strip_alias, window_udfs};

/// Pipeline settings a `SET` statement (or `--set`) may change, with their types.
pub const SETTINGS: &[(&str, OptionKind, &str)] = &[
    ("parallelism", OptionKind::Int { min: 1, max: 4096 }, "subtasks per parallel operator (default: CPU cores)"),
    (
        "max_parallelism",
        OptionKind::Int { min: 1, max: 32768 },
        "key groups; fixed for the life of a job's state (default 128)",
    ),
    (
        "dedup_ttl",
        OptionKind::Duration,
        "how long (event time) a dedup remembers a key when no window bounds it: from its first row, or from the \
         watermark a late first row arrived at",
    ),
    (
        "late_rows",
        OptionKind::Enum(&["drop", "dead_letter"]),
        "what windows do with rows whose windows have closed (a dedup keeps the late rows it receives)",
    ),
    ("dead_letter_path", OptionKind::String, "directory for dead-letter records (bad input, late rows)"),
    ("batch_size", OptionKind::Int { min: 1, max: 1 << 20 }, "rows per batch sources aim for (default 8192)"),
    ("checkpoint_interval", OptionKind::Duration, "time between checkpoints, when the job takes them (default 10s)"),
    (
        "checkpoint_timeout",
        OptionKind::Duration,
        "a checkpoint not complete after this long is aborted (default 10 minutes)",
    ),
    ("checkpoints_retained", OptionKind::Int { min: 1, max: 1000 }, "completed checkpoints kept (default 3)"),
    (
        "checkpoint_tolerable_failures",
        OptionKind::Int { min: 0, max: 1000 },
        "checkpoints that may fail in a row before the job fails (default 3)",
    ),
];

/// Plans pipelines against a set of connectors.
#[derive(Debug, Clone)]
pub struct Planner {
    connectors: ConnectorCatalog,
    default_parallelism: usize,
    overrides: Vec<(String, String)>,
    variables: Variables,
}

impl Planner {
    /// A planner whose default parallelism is the number of CPU cores.
    pub fn new(connectors: ConnectorCatalog) -> Self {
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        Planner { connectors, default_parallelism: cores, overrides: Vec::new(), variables: Variables::none() }
    }

    /// Values for `${NAME}` in option and setting values.
    pub fn with_variables(mut self, variables: Variables) -> Self {
        self.variables = variables;
        self
    }

    /// Overrides a setting after the pipeline's own `SET`s (command-line `--set key=value`).
    pub fn with_setting(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.overrides.push((key.into(), value.into()));
        self
    }

    /// The connectors this planner knows.
    pub fn connectors(&self) -> &ConnectorCatalog {
        &self.connectors
    }

    /// Compiles a pipeline, or explains what is wrong and where.
    pub async fn plan(&self, text: &str) -> Result<Pipeline> {
        let pre = preprocess(text)?;
        let words = WordIndex::new(&pre.sql);
        let statements = Parser::new(&GenericDialect {})
            .try_with_sql(&pre.sql)
            .and_then(|mut p| p.parse_statements())
            .map_err(|e| PlanError::from_parser(&e))?;
        if statements.is_empty() {
            return Err(PlanError::invalid("the pipeline is empty")
                .hint("declare tables with CREATE TABLE and write INSERT INTO ... SELECT ..."));
        }

        let mut settings = SettingsBuilder::new(self.default_parallelism);
        let mut tables: BTreeMap<String, Arc<TableDef>> = BTreeMap::new();
        let mut inserts: Vec<InsertStmt> = Vec::new();
        let create_locations: Vec<(Location, usize)> = statements
            .iter()
            .enumerate()
            .filter(|(_, s)| matches!(s, Statement::CreateTable(_)))
            .filter_map(|(i, s)| {
                words.statements.get(i).copied().or_else(|| Location::from_span(s.span())).map(|l| (l, i))
            })
            .collect();
        let mut watermark_of: HashMap<usize, WatermarkClause> = HashMap::new();
        for clause in &pre.watermarks {
            let owner = create_locations.iter().rev().find(|(l, _)| *l <= clause.location).map(|(_, i)| *i);
            let Some(owner) = owner else {
                return Err(PlanError::new(PlanErrorKind::Syntax, "WATERMARK FOR outside CREATE TABLE")
                    .at(Some(clause.location)));
            };
            if watermark_of.insert(owner, clause.clone()).is_some() {
                return Err(PlanError::invalid("a table can declare only one WATERMARK").at(Some(clause.location)));
            }
        }

        for (idx, stmt) in statements.into_iter().enumerate() {
            let location = words.statements.get(idx).copied().or_else(|| Location::from_span(stmt.span()));
            match stmt {
                Statement::CreateTable(ct) => {
                    let table = TableDef::from_statement(
                        &ct,
                        watermark_of.remove(&idx),
                        &self.connectors,
                        location,
                        &self.variables,
                    )?;
                    if tables.contains_key(&table.name) {
                        return Err(
                            PlanError::invalid(format!("table '{}' is declared twice", table.name)).at(location)
                        );
                    }
                    tables.insert(table.name.clone(), Arc::new(table));
                }
                Statement::Set(set) => settings.apply_statement(&set, location, &self.variables)?,
                Statement::Insert(insert) => inserts.push(InsertStmt::from_ast(insert, location)?),
                Statement::Query(_) => {
                    return Err(PlanError::unsupported("a bare SELECT has nowhere to go")
                        .at(location)
                        .hint("write INSERT INTO <sink> SELECT ...; a sink with connector = 'stdout' prints rows"));
                }
                other => {
                    let kind = other.to_string().split_whitespace().take(2).collect::<Vec<_>>().join(" ");
                    return Err(PlanError::unsupported(format!(
                        "statement '{kind} ...' is not supported in a pipeline"
                    ))
                    .at(location)
                    .hint("a pipeline holds SET, CREATE TABLE and INSERT INTO ... SELECT statements"));
                }
            }
        }
        for (k, v) in &self.overrides {
            settings.apply(k, v, None)?;
        }
        let settings = settings.build();
        if inserts.is_empty() {
            return Err(PlanError::invalid("the pipeline has no INSERT INTO ... SELECT, so nothing would run"));
        }

        let ctx = session(&tables)?;
        // Phase A: plan every query, find which tables are read and which columns of them.
        let mut planned = Vec::with_capacity(inserts.len());
        for insert in &inserts {
            if !tables.contains_key(&insert.table) {
                return Err(PlanError::unknown(format!("INSERT INTO unknown table '{}'", insert.table))
                    .at(insert.location)
                    .hint("declare it first with CREATE TABLE ... WITH (connector = ...)"));
            }
            let plan = plan_query(&ctx, insert).await?;
            planned.push(plan);
        }
        let mut read_columns: BTreeMap<String, BTreeSet<usize>> = BTreeMap::new();
        for (plan, insert) in planned.iter().zip(&inserts) {
            let mut err = None;
            let _ = plan.apply(|p| {
                if let LogicalPlan::TableScan(scan) = p {
                    let name = scan.table_name.table().to_string();
                    let Some(table) = tables.get(&name) else {
                        err = Some(PlanError::internal(format!("scan of unregistered table {name}")));
                        return Ok(TreeNodeRecursion::Stop);
                    };
                    let cols = read_columns.entry(name).or_default();
                    match &scan.projection {
                        Some(p) => cols.extend(p.iter().copied()),
                        None => cols.extend(0..table.schema.fields().len()),
                    }
                }
                Ok(TreeNodeRecursion::Continue)
            });
            if let Some(e) = err {
                return Err(e.at(insert.location));
            }
        }

        // Roles: validate options for what each table does.
        let sink_names: BTreeSet<String> = inserts.iter().map(|i| i.table.clone()).collect();
        for name in read_columns.keys() {
            if sink_names.contains(name) {
                let t = &tables[name];
                return Err(PlanError::unsupported(format!("table '{name}' is both read and written"))
                    .at(t.location)
                    .hint("use separate tables for the source and the sink"));
            }
        }
        for (name, table) in tables.iter_mut() {
            if read_columns.contains_key(name) {
                *table = Arc::new(table.validate_role(&self.connectors, TableRole::Source)?);
            } else if sink_names.contains(name) {
                *table = Arc::new(table.validate_role(&self.connectors, TableRole::Sink)?);
            } else {
                tracing::warn!(table = %name, "table is declared but neither read nor written");
            }
        }

        // Phase B: translate.
        let keyed_sinks: BTreeSet<String> = tables
            .values()
            .filter(|t| sink_names.contains(&t.name) && !t.primary_key.is_empty())
            .filter(|t| self.connectors.get(&t.connector).is_some_and(|c| c.sink_partitioned_by_key(t)))
            .map(|t| t.name.clone())
            .collect();
        let collapsed_sinks: BTreeMap<String, Vec<String>> = tables
            .values()
            .filter(|t| keyed_sinks.contains(&t.name))
            .filter_map(|t| Some((t.name.clone(), self.connectors.get(&t.connector)?.sink_collapse_sequence(t)?)))
            .collect();
        let mut tr = Translator {
            keyed_sinks,
            collapsed_sinks,
            settings: &settings,
            tables: &tables,
            graph: DataflowGraph::default(),
            sources: HashMap::new(),
            sinks: HashMap::new(),
            dedups: Vec::new(),
            props: ExecutionProps::new(),
            words: &words,
            stmt: None,
        };
        for (name, cols) in &read_columns {
            tr.add_source(&ctx, &tables[name], cols).await?;
        }
        for (plan, insert) in planned.iter().zip(&inserts) {
            tr.stmt = insert.location;
            let stream = tr.translate(plan).map_err(|e| e.at(insert.location))?;
            tr.add_sink(stream, insert, &tables[&insert.table]).map_err(|e| e.at(insert.location))?;
        }
        for d in &tr.dedups {
            if !d.confirmed {
                return Err(PlanError::unsupported(
                    "ROW_NUMBER() is only supported as the dedup idiom: filter its result with rn = 1",
                )
                .at(d.location)
                .hint("SELECT ... FROM (SELECT *, ROW_NUMBER() OVER (PARTITION BY id ORDER BY time) AS rn FROM t) WHERE rn = 1"));
            }
        }
        let graph = tr.graph;
        Ok(Pipeline { settings, tables, graph })
    }
}

/// An `INSERT INTO table [(cols)] <query>`.
struct InsertStmt {
    table: String,
    columns: Vec<String>,
    query: Box<sql::Query>,
    location: Option<Location>,
}

impl InsertStmt {
    fn from_ast(insert: sql::Insert, location: Option<Location>) -> Result<Self> {
        let TableObject::TableName(name) = &insert.table else {
            return Err(PlanError::unsupported("INSERT INTO a table function is not supported").at(location));
        };
        if insert.overwrite || insert.on.is_some() || insert.returning.is_some() || insert.partitioned.is_some() {
            return Err(PlanError::unsupported(
                "INSERT OVERWRITE / ON CONFLICT / RETURNING / PARTITION are not supported",
            )
            .at(location));
        }
        let Some(mut query) = insert.source else {
            return Err(PlanError::invalid("INSERT needs a SELECT").at(location));
        };
        rewrite_window_bounds(&mut query);
        let columns = insert.columns.iter().map(|c| normalize_object_name(&c.to_string())).collect();
        Ok(InsertStmt { table: normalize_object_name(&name.to_string()), columns, query, location })
    }
}

/// `TUMBLE_START(t, i)` → `get_field(TUMBLE(t, i), 'start')`, likewise `_END` and for HOP and SESSION.
fn rewrite_window_bounds(query: &mut sql::Query) {
    struct Rewriter;
    impl VisitorMut for Rewriter {
        type Break = ();
        fn post_visit_expr(&mut self, expr: &mut SqlExpr) -> ControlFlow<()> {
            if let SqlExpr::Function(f) = expr {
                let name = f.name.to_string();
                if let Some((base, bound)) = split_bound_function(&name) {
                    let mut inner = f.clone();
                    inner.name = ObjectName::from(vec![Ident::new(base)]);
                    let mut outer = f.clone();
                    outer.name = ObjectName::from(vec![Ident::new("get_field")]);
                    outer.args = FunctionArguments::List(FunctionArgumentList {
                        duplicate_treatment: None,
                        args: vec![
                            FunctionArg::Unnamed(FunctionArgExpr::Expr(SqlExpr::Function(inner))),
                            FunctionArg::Unnamed(FunctionArgExpr::Expr(SqlExpr::value(Value::SingleQuotedString(
                                bound.to_string(),
                            )))),
                        ],
                        clauses: vec![],
                    });
                    *expr = SqlExpr::Function(outer);
                }
            }
            ControlFlow::Continue(())
        }
    }
    let _ = query.visit(&mut Rewriter);
}

fn session(tables: &BTreeMap<String, Arc<TableDef>>) -> Result<SessionContext> {
    let mut config = SessionConfig::new();
    config.options_mut().sql_parser.collect_spans = true;
    let state = SessionStateBuilder::new()
        .with_config(config)
        .with_default_features()
        .with_optimizer_rules(vec![Arc::new(OptimizeProjections::new())])
        .build();
    let mut ctx = SessionContext::new_with_state(state);
    for udf in window_udfs() {
        ctx.register_udf(udf);
    }
    datafusion_functions_json::register_all(&mut ctx).map_err(PlanError::from_datafusion)?;
    for (name, table) in tables {
        ctx.register_table(TableReference::bare(name.as_str()), Arc::new(EmptyTable::new(table.schema.clone())))
            .map_err(PlanError::from_datafusion)?;
    }
    Ok(ctx)
}

async fn plan_query(ctx: &SessionContext, insert: &InsertStmt) -> Result<LogicalPlan> {
    let state = ctx.state();
    let stmt = DFStatement::Statement(Box::new(Statement::Query(insert.query.clone())));
    let plan = state.statement_to_plan(stmt).await.map_err(|e| PlanError::from_datafusion(e).at(insert.location))?;
    state.optimize(&plan).map_err(|e| PlanError::from_datafusion(e).at(insert.location))
}

/// Settings as they are applied, in order.
struct SettingsBuilder {
    values: BTreeMap<&'static str, OptionValue>,
    default_parallelism: usize,
}

impl SettingsBuilder {
    fn new(default_parallelism: usize) -> Self {
        SettingsBuilder { values: BTreeMap::new(), default_parallelism }
    }

    fn apply_statement(&mut self, set: &sql::Set, location: Option<Location>, variables: &Variables) -> Result<()> {
        let sql::Set::SingleAssignment { variable, values, .. } = set else {
            return Err(PlanError::unsupported(format!("{set} is not supported; write SET key = 'value'")).at(location));
        };
        let key = variable.to_string().to_ascii_lowercase();
        let [value] = values.as_slice() else {
            return Err(PlanError::invalid(format!("SET {key} takes one value")).at(location));
        };
        let text = match value {
            SqlExpr::Value(v) => match &v.value {
                Value::SingleQuotedString(s) | Value::DoubleQuotedString(s) => s.clone(),
                Value::Number(n, _) => n.clone(),
                Value::Boolean(b) => b.to_string(),
                other => other.to_string(),
            },
            SqlExpr::Identifier(id) => id.value.clone(),
            other => other.to_string(),
        };
        let text = variables.substitute(&text).map_err(|e| e.at(location))?;
        self.apply(&key, &text, location)
    }

    fn apply(&mut self, key: &str, value: &str, location: Option<Location>) -> Result<()> {
        let key = key.trim().to_ascii_lowercase();
        let Some((name, kind, _)) = SETTINGS.iter().find(|(n, _, _)| *n == key) else {
            let names: Vec<&str> = SETTINGS.iter().map(|(n, _, _)| *n).collect();
            let mut err = PlanError::unknown(format!("unknown setting '{key}'")).at(location);
            err = match closest(&key, &names) {
                Some(c) => err.hint(format!("did you mean '{c}'? settings: {}", names.join(", "))),
                None => err.hint(format!("settings: {}", names.join(", "))),
            };
            return Err(err);
        };
        let v = parse_option_value(*kind, value)
            .map_err(|reason| PlanError::invalid(format!("setting '{key}': {reason}")).at(location))?;
        self.values.insert(name, v);
        Ok(())
    }

    fn build(self) -> Settings {
        let int = |k: &str| match self.values.get(k) {
            Some(OptionValue::Int(i)) => Some(*i),
            _ => None,
        };
        let duration = |k: &str| match self.values.get(k) {
            Some(OptionValue::Duration(d)) => Some(*d),
            _ => None,
        };
        Settings {
            parallelism: int("parallelism").map(|i| i as usize).unwrap_or(self.default_parallelism).max(1),
            max_parallelism: int("max_parallelism").map(|i| i as u32).unwrap_or(nagare_core::DEFAULT_MAX_PARALLELISM),
            dedup_ttl: match self.values.get("dedup_ttl") {
                Some(OptionValue::Duration(d)) => Some(*d),
                _ => None,
            },
            late_rows: match self.values.get("late_rows") {
                Some(OptionValue::String(s)) if s == "dead_letter" => LateRowPolicy::DeadLetter,
                _ => LateRowPolicy::Drop,
            },
            dead_letter_path: match self.values.get("dead_letter_path") {
                Some(OptionValue::String(s)) => Some(s.clone()),
                _ => None,
            },
            batch_size: int("batch_size").map(|i| i as usize).unwrap_or(8192),
            checkpoint_interval: duration("checkpoint_interval").unwrap_or(Duration::from_secs(10)),
            checkpoint_timeout: duration("checkpoint_timeout").unwrap_or(Duration::from_secs(600)),
            checkpoints_retained: int("checkpoints_retained").map(|i| i as usize).unwrap_or(3),
            checkpoint_tolerable_failures: int("checkpoint_tolerable_failures").map(|i| i as u32).unwrap_or(3),
        }
    }
}

/// Locations of words and statements in the text, to point errors found in logical plans back at the SQL.
struct WordIndex {
    words: Vec<(String, Location)>,
    statements: Vec<Location>,
}

impl WordIndex {
    fn new(sql: &str) -> Self {
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
    fn find(&self, word: &str, from: Option<Location>) -> Option<Location> {
        let from = from.unwrap_or(Location { line: 0, column: 0 });
        self.words.iter().find(|(w, l)| *l >= from && w.eq_ignore_ascii_case(word)).map(|(_, l)| *l)
    }
}

/// A translated plan node: where its rows come from and what they look like.
#[derive(Clone)]
struct Stream {
    node: NodeId,
    schema: DFSchemaRef,
    event_time: Option<usize>,
    /// Columns holding a ROW_NUMBER() of a dedup candidate (column → index in `dedups`).
    row_numbers: HashMap<usize, usize>,
    parallelism: usize,
}

struct DedupCandidate {
    confirmed: bool,
    location: Option<Location>,
}

struct Translator<'a> {
    settings: &'a Settings,
    tables: &'a BTreeMap<String, Arc<TableDef>>,
    graph: DataflowGraph,
    sources: HashMap<String, (NodeId, Vec<usize>)>,
    sinks: HashMap<String, NodeId>,
    dedups: Vec<DedupCandidate>,
    props: ExecutionProps,
    words: &'a WordIndex,
    stmt: Option<Location>,
    /// Sinks whose input is partitioned by their PRIMARY KEY.
    keyed_sinks: BTreeSet<String>,
    /// Keyed sinks that take one image per key per checkpoint, with the columns ordering a key's changes.
    collapsed_sinks: BTreeMap<String, Vec<String>>,
}

impl Translator<'_> {
    fn add_node(
        &mut self,
        label: String,
        operator: OperatorSpec,
        parallelism: usize,
        schema: SchemaRef,
        event_time: Option<usize>,
    ) -> NodeId {
        let id = self.graph.nodes.len();
        self.graph.nodes.push(Node { id, label, operator, parallelism, schema, event_time });
        id
    }

    fn connect(&mut self, from: NodeId, to: NodeId, partitioning: Partitioning) {
        self.graph.edges.push(Edge { from, to, partitioning });
    }

    fn physical(&self, expr: &Expr, schema: &DFSchema) -> Result<Arc<dyn PhysicalExpr>> {
        create_physical_expr(expr, schema, &self.props, &PhysicalPlanningContext::default())
            .map_err(PlanError::from_datafusion)
    }

    fn locate(&self, word: &str) -> Option<Location> {
        self.words.find(word, self.stmt).or(self.stmt)
    }

    async fn add_source(&mut self, ctx: &SessionContext, table: &Arc<TableDef>, cols: &BTreeSet<usize>) -> Result<()> {
        let mut projection: BTreeSet<usize> = cols.clone();
        let wm_col = match &table.watermark {
            Some(w) => {
                let idx =
                    table.schema.index_of(&w.column).map_err(|_| PlanError::internal("watermark column vanished"))?;
                projection.insert(idx);
                Some(idx)
            }
            None => None,
        };
        let projection: Vec<usize> = projection.into_iter().collect();
        let schema = Arc::new(table.schema.project(&projection).map_err(|e| PlanError::internal(e.to_string()))?);
        let df_schema =
            DFSchema::try_from_qualified_schema(table.name.as_str(), &schema).map_err(PlanError::from_datafusion)?;
        let event_time = wm_col.and_then(|c| projection.iter().position(|p| *p == c));
        let watermark = match (&table.watermark, event_time) {
            (Some(w), Some(column)) => Some(self.watermark_spec(ctx, table, w, &df_schema, column).await?),
            _ => None,
        };
        let label = format!("source {} ({})", table.name, table.connector);
        let id = self.add_node(
            label,
            OperatorSpec::Source(SourceSpec { table: table.clone(), projection: projection.clone(), watermark }),
            self.settings.parallelism,
            schema,
            event_time,
        );
        self.sources.insert(table.name.clone(), (id, projection));
        Ok(())
    }

    async fn watermark_spec(
        &self,
        ctx: &SessionContext,
        table: &TableDef,
        w: &WatermarkClause,
        df_schema: &DFSchema,
        column: usize,
    ) -> Result<WatermarkSpec> {
        let at = Some(w.expr_location);
        let query = format!("SELECT {} FROM \"{}\"", w.expr, table.name.replace('"', "\"\""));
        let plan = ctx.state().create_logical_plan(&query).await.map_err(|e| {
            let mut e = PlanError::from_datafusion(e);
            e.location = at;
            e
        })?;
        let state = ctx.state();
        let plan = state.analyzer().execute_and_check(plan, state.config_options(), |_, _| {}).map_err(|e| {
            let mut e = PlanError::from_datafusion(e);
            e.location = at;
            e
        })?;
        let LogicalPlan::Projection(p) = &plan else {
            return Err(PlanError::invalid("WATERMARK expression must be a single expression").at(at));
        };
        let expr = p.expr.first().cloned().ok_or_else(|| PlanError::invalid("empty WATERMARK expression").at(at))?;
        let expr = strip_alias(&expr).clone();
        let ty = expr.get_type(p.input.schema()).map_err(PlanError::from_datafusion)?;
        if !matches!(ty, DataType::Timestamp(_, _)) {
            return Err(PlanError::new(
                PlanErrorKind::TypeMismatch,
                format!("WATERMARK expression must be a TIMESTAMP, got {}", crate::types::arrow_to_sql(&ty)),
            )
            .at(at));
        }
        for c in expr.column_refs() {
            if c.name != w.column {
                return Err(PlanError::invalid(format!(
                    "WATERMARK FOR {} may only use column '{}', not '{}'",
                    w.column, w.column, c.name
                ))
                .at(at));
            }
        }
        // Re-qualify against the source's projected schema.
        let expr = expr
            .transform(|e| {
                Ok(match e {
                    Expr::Column(c) => datafusion::common::tree_node::Transformed::yes(Expr::Column(
                        datafusion::common::Column::new(Some(table.name.as_str()), c.name),
                    )),
                    other => datafusion::common::tree_node::Transformed::no(other),
                })
            })
            .map_err(PlanError::from_datafusion)?
            .data;
        let physical = self.physical(&expr, df_schema).map_err(|e| e.at(at))?;
        Ok(WatermarkSpec { column, expr: physical, text: w.expr.clone() })
    }

    fn translate(&mut self, plan: &LogicalPlan) -> Result<Stream> {
        match plan {
            LogicalPlan::TableScan(scan) => self.translate_scan(scan),
            LogicalPlan::Projection(p) => self.translate_projection(p),
            LogicalPlan::Filter(f) => self.translate_filter(&f.predicate, &f.input),
            LogicalPlan::SubqueryAlias(a) => {
                let mut s = self.translate(&a.input)?;
                s.schema = a.schema.clone();
                Ok(s)
            }
            LogicalPlan::Window(w) => self.translate_window(w),
            LogicalPlan::Aggregate(a) => self.translate_aggregate(a),
            LogicalPlan::Distinct(Distinct::All(input)) => self.translate_distinct(input),
            LogicalPlan::Distinct(Distinct::On(_)) => {
                Err(PlanError::unsupported("DISTINCT ON is not supported").at(self.locate("DISTINCT")))
            }
            LogicalPlan::Union(u) => self.translate_union(u),
            LogicalPlan::Sort(_) => Err(PlanError::unsupported("ORDER BY has no meaning on an unbounded stream")
                .at(self.locate("ORDER"))
                .hint("remove it; to keep the first or last row per key use ROW_NUMBER() ... = 1")),
            LogicalPlan::Limit(_) => {
                Err(PlanError::unsupported("LIMIT is not supported on a stream").at(self.locate("LIMIT")))
            }
            LogicalPlan::Join(_) => Err(PlanError::unsupported("joins are not supported yet").at(self.locate("JOIN"))),
            LogicalPlan::Unnest(_) => {
                Err(PlanError::unsupported("UNNEST is not supported yet").at(self.locate("UNNEST")))
            }
            LogicalPlan::EmptyRelation(_) | LogicalPlan::Values(_) => {
                Err(PlanError::unsupported("a pipeline query must read from a source table (FROM <table>)"))
            }
            other => {
                Err(PlanError::unsupported(format!("{} is not supported in a streaming pipeline", other.display())))
            }
        }
    }

    fn translate_scan(&mut self, scan: &datafusion::logical_expr::TableScan) -> Result<Stream> {
        let name = scan.table_name.table().to_string();
        let table = self.tables.get(&name).ok_or_else(|| PlanError::internal(format!("unknown table {name}")))?.clone();
        let (source, source_cols) =
            self.sources.get(&name).cloned().ok_or_else(|| PlanError::internal("source not added"))?;
        if !scan.filters.is_empty() || scan.fetch.is_some() {
            return Err(PlanError::internal("unexpected pushed-down filter or limit"));
        }
        let wanted: Vec<usize> = scan.projection.clone().unwrap_or_else(|| (0..table.schema.fields().len()).collect());
        let source_node = &self.graph.nodes[source];
        let source_et = source_node.event_time;
        let parallelism = source_node.parallelism;
        let positions: Vec<usize> = wanted
            .iter()
            .map(|c| source_cols.iter().position(|s| s == c).ok_or_else(|| PlanError::internal("column not read")))
            .collect::<Result<_>>()?;
        let event_time = source_et.and_then(|et| positions.iter().position(|p| *p == et));
        if positions == (0..source_cols.len()).collect::<Vec<_>>() {
            return Ok(Stream {
                node: source,
                schema: scan.projected_schema.clone(),
                event_time,
                row_numbers: HashMap::new(),
                parallelism,
            });
        }
        let source_schema = self.graph.nodes[source].schema.clone();
        let exprs: Vec<Arc<dyn PhysicalExpr>> = positions
            .iter()
            .map(|p| {
                Arc::new(datafusion::physical_expr::expressions::Column::new(source_schema.field(*p).name(), *p))
                    as Arc<dyn PhysicalExpr>
            })
            .collect();
        let schema = Arc::new(scan.projected_schema.as_arrow().clone());
        let label = format!("project {}", describe_columns(&schema));
        let node = self.add_node(
            label,
            OperatorSpec::Calc(CalcSpec { filter: None, exprs: Some(exprs) }),
            parallelism,
            schema,
            event_time,
        );
        self.connect(source, node, Partitioning::Forward);
        Ok(Stream { node, schema: scan.projected_schema.clone(), event_time, row_numbers: HashMap::new(), parallelism })
    }

    fn check_row_wise(&self, expr: &Expr) -> Result<()> {
        if let Some(call) = as_window_call(expr) {
            let name = match call {
                Ok((WindowKind::Hop { .. }, _)) => "HOP",
                Ok((WindowKind::Session { .. }, _)) => "SESSION",
                Ok((WindowKind::Tumble { .. }, _)) => return Ok(()),
                Err(m) => return Err(PlanError::invalid(m)),
            };
            return Err(PlanError::unsupported(format!("{name}() can only be used in GROUP BY")).at(self.locate(name)));
        }
        let mut result = Ok(());
        let _ = expr.apply(|e| {
            match e {
                Expr::ScalarFunction(f) if ["hop", "session"].contains(&f.func.name()) => {
                    let n = f.func.name().to_uppercase();
                    result =
                        Err(PlanError::unsupported(format!("{n}() can only be used in GROUP BY")).at(self.locate(&n)));
                    return Ok(TreeNodeRecursion::Stop);
                }
                Expr::ScalarSubquery(_) | Expr::Exists(_) | Expr::InSubquery(_) => {
                    result =
                        Err(PlanError::unsupported("subqueries in expressions are not supported")
                            .at(self.locate("SELECT")));
                    return Ok(TreeNodeRecursion::Stop);
                }
                _ => {}
            }
            Ok(TreeNodeRecursion::Continue)
        });
        result
    }

    fn translate_projection(&mut self, p: &Projection) -> Result<Stream> {
        let input = self.translate(&p.input)?;
        let mut exprs = Vec::with_capacity(p.expr.len());
        let mut event_time = None;
        let mut row_numbers = HashMap::new();
        let mut identity = p.expr.len() == input.schema.fields().len();
        for (i, e) in p.expr.iter().enumerate() {
            self.check_row_wise(e)?;
            if let Expr::Column(c) = strip_alias(e) {
                let idx = input.schema.index_of_column(c).map_err(PlanError::from_datafusion)?;
                if input.event_time == Some(idx) && event_time.is_none() {
                    event_time = Some(i);
                }
                if let Some(d) = input.row_numbers.get(&idx) {
                    row_numbers.insert(i, *d);
                }
                identity &= idx == i;
            } else {
                identity = false;
            }
            exprs.push(self.physical(e, &input.schema)?);
        }
        if identity {
            return Ok(Stream { schema: p.schema.clone(), event_time, row_numbers, ..input });
        }
        let schema = Arc::new(p.schema.as_arrow().clone());
        let label = format!("project {}", describe_columns(&schema));
        let node = self.add_node(
            label,
            OperatorSpec::Calc(CalcSpec { filter: None, exprs: Some(exprs) }),
            input.parallelism,
            schema,
            event_time,
        );
        self.connect(input.node, node, Partitioning::Forward);
        Ok(Stream { node, schema: p.schema.clone(), event_time, row_numbers, parallelism: input.parallelism })
    }

    fn translate_filter(&mut self, predicate: &Expr, input_plan: &LogicalPlan) -> Result<Stream> {
        let input = self.translate(input_plan)?;
        let mut rest = Vec::new();
        for conjunct in split_conjunction(predicate) {
            self.check_row_wise(conjunct)?;
            let refs_rn: Vec<usize> = conjunct
                .column_refs()
                .iter()
                .filter_map(|c| input.schema.index_of_column(c).ok())
                .filter(|i| input.row_numbers.contains_key(i))
                .collect();
            if refs_rn.is_empty() {
                rest.push(conjunct.clone());
                continue;
            }
            match row_number_is_one(conjunct, &input.schema) {
                Some(col) if input.row_numbers.contains_key(&col) => {
                    self.dedups[input.row_numbers[&col]].confirmed = true;
                }
                _ => {
                    return Err(PlanError::unsupported(format!(
                        "the row number can only be compared with 1 (the dedup idiom), not in '{conjunct}'"
                    ))
                    .at(self.locate("WHERE"))
                    .hint("use WHERE rn = 1"));
                }
            }
        }
        let Some(filter) = conjunction(rest) else { return Ok(input) };
        let physical = self.physical(&filter, &input.schema)?;
        let schema = Arc::new(input.schema.as_arrow().clone());
        let label = format!("filter {filter}");
        let node = self.add_node(
            label,
            OperatorSpec::Calc(CalcSpec { filter: Some(physical), exprs: None }),
            input.parallelism,
            schema,
            input.event_time,
        );
        self.connect(input.node, node, Partitioning::Forward);
        Ok(Stream { node, ..input })
    }

    fn require_event_time(&self, input: &Stream, time: &Expr, what: &str) -> Result<usize> {
        let used = match strip_alias(time) {
            Expr::Column(c) => input.schema.index_of_column(c).ok(),
            _ => None,
        };
        match (input.event_time, used) {
            (Some(et), Some(u)) if et == u => Ok(et),
            (Some(et), _) => Err(PlanError::invalid(format!(
                "{what} must use the event-time column '{}' (the one with WATERMARK FOR), not '{time}'",
                input.schema.field(et).name()
            ))
            .at(self.locate(what))),
            (None, _) => {
                Err(PlanError::invalid(format!("{what} must use an event-time column, and '{time}' is not one"))
                    .at(self.locate(what))
                    .hint("declare it on the source table: WATERMARK FOR time AS time - INTERVAL '5' SECOND"))
            }
        }
    }

    fn keys_partitioning(&self, keys: &[Arc<dyn PhysicalExpr>]) -> (Partitioning, usize) {
        if keys.is_empty() {
            (Partitioning::Single, 1)
        } else {
            (Partitioning::Hash { keys: keys.to_vec() }, self.settings.parallelism)
        }
    }

    fn check_key_type(&self, e: &Expr, schema: &DFSchema, what: &str) -> Result<()> {
        let ty = e.get_type(schema).map_err(PlanError::from_datafusion)?;
        if !nagare_core::is_hashable_type(&ty) {
            return Err(PlanError::new(
                PlanErrorKind::TypeMismatch,
                format!("{what} key '{e}' has type {} which cannot be a key", crate::types::arrow_to_sql(&ty)),
            )
            .at(self.stmt)
            .hint("use scalar columns (text, numbers, timestamps) as keys; extract fields with col.field"));
        }
        Ok(())
    }

    fn translate_window(&mut self, w: &datafusion::logical_expr::Window) -> Result<Stream> {
        let input = self.translate(&w.input)?;
        let loc = self.locate("ROW_NUMBER");
        let [wexpr] = w.window_expr.as_slice() else {
            return Err(PlanError::unsupported(
                "only one window function (the ROW_NUMBER() dedup idiom) per query is supported",
            )
            .at(self.locate("OVER")));
        };
        let Expr::WindowFunction(wf) = strip_alias(wexpr) else {
            return Err(PlanError::internal(format!("unexpected window expression {wexpr}")));
        };
        let WindowFunction { fun, params } = wf.as_ref();
        if fun.name() != "row_number" {
            let name = fun.name().to_uppercase();
            return Err(PlanError::unsupported(format!("window function {name}() OVER (...) is not supported"))
                .at(self.locate(&name))
                .hint(
                    "use windowed GROUP BY (TUMBLE/HOP/SESSION) for aggregates, and ROW_NUMBER() ... = 1 for dedup",
                ));
        }
        if params.order_by.len() != 1 {
            return Err(PlanError::invalid("dedup needs exactly one ORDER BY column: the event time").at(loc).hint(
                "ROW_NUMBER() OVER (PARTITION BY id ORDER BY time) keeps the first; ORDER BY time DESC the last",
            ));
        }
        let SortExpr { expr: order_expr, asc, .. } = &params.order_by[0];
        let time_column = self.require_event_time(&input, order_expr, "ROW_NUMBER")?;
        let keep = if *asc { Keep::First } else { Keep::Last };
        let mut keys = Vec::new();
        let mut key_names = Vec::new();
        let mut window = None;
        for p in &params.partition_by {
            match as_window_call(p) {
                Some(Ok((WindowKind::Tumble { size_us }, time))) => {
                    self.require_event_time(&input, &time, "TUMBLE")?;
                    if window.replace(size_us).is_some() {
                        return Err(PlanError::invalid("only one window in PARTITION BY").at(loc));
                    }
                }
                Some(Ok((kind, _))) => {
                    return Err(PlanError::unsupported(format!(
                        "dedup within {} is not supported; use TUMBLE",
                        kind.describe()
                    ))
                    .at(loc));
                }
                Some(Err(m)) => return Err(PlanError::invalid(m).at(loc)),
                None => {
                    if contains_window_call(p) {
                        return Err(PlanError::unsupported("window functions in PARTITION BY must stand alone").at(loc));
                    }
                    self.check_key_type(p, &input.schema, "dedup")?;
                    keys.push(self.physical(p, &input.schema)?);
                    key_names.push(p.to_string());
                }
            }
        }
        if keys.is_empty() {
            return Err(PlanError::invalid("dedup needs PARTITION BY <key>").at(loc));
        }
        let scope = match (window, self.settings.dedup_ttl) {
            (Some(size_us), _) => DedupScope::Window { size_us },
            (None, Some(ttl)) => DedupScope::Ttl { ttl_us: ttl.as_micros().min(i64::MAX as u128) as i64 },
            (None, None) => {
                return Err(PlanError::invalid("dedup state would grow without bound")
                    .at(loc)
                    .hint("bound it with SET dedup_ttl = '10 minutes'; or add a window: PARTITION BY id, TUMBLE(time, INTERVAL '1' HOUR)"));
            }
        };
        let (partitioning, parallelism) = self.keys_partitioning(&keys);
        let schema = Arc::new(w.schema.as_arrow().clone());
        let label = format!(
            "dedup keep-{} by ({}) {}",
            if keep == Keep::First { "first" } else { "last" },
            key_names.join(", "),
            match scope {
                DedupScope::Ttl { ttl_us } =>
                    format!("ttl {}", nagare_core::format_duration(std::time::Duration::from_micros(ttl_us as u64))),
                DedupScope::Window { size_us } => WindowKind::Tumble { size_us }.describe(),
            }
        );
        let spec = DedupSpec { keys, key_names, time_column, keep, scope };
        let node = self.add_node(label, OperatorSpec::Dedup(spec), parallelism, schema, Some(time_column));
        self.connect(input.node, node, partitioning);
        self.dedups.push(DedupCandidate { confirmed: false, location: loc });
        let mut row_numbers = HashMap::new();
        row_numbers.insert(w.schema.fields().len() - 1, self.dedups.len() - 1);
        Ok(Stream { node, schema: w.schema.clone(), event_time: Some(time_column), row_numbers, parallelism })
    }

    fn translate_aggregate(&mut self, agg: &Aggregate) -> Result<Stream> {
        let input = self.translate(&agg.input)?;
        if agg.group_expr.iter().any(|e| matches!(e, Expr::GroupingSet(_))) {
            return Err(
                PlanError::unsupported("GROUPING SETS / ROLLUP / CUBE are not supported").at(self.locate("GROUP"))
            );
        }
        let mut window = None;
        let mut keys = Vec::new();
        for (i, g) in agg.group_expr.iter().enumerate() {
            match as_window_call(g) {
                Some(Ok((kind, time))) => {
                    let what = match kind {
                        WindowKind::Tumble { .. } => "TUMBLE",
                        WindowKind::Hop { .. } => "HOP",
                        WindowKind::Session { .. } => "SESSION",
                    };
                    let tc = self.require_event_time(&input, &time, what)?;
                    if window.replace((i, kind, tc)).is_some() {
                        return Err(PlanError::unsupported("only one window per GROUP BY").at(self.locate("GROUP")));
                    }
                }
                Some(Err(m)) => return Err(PlanError::invalid(m).at(self.locate("GROUP"))),
                None => {
                    if contains_window_call(g) {
                        return Err(PlanError::unsupported(format!(
                            "window functions in GROUP BY must stand alone, not in '{g}'"
                        ))
                        .at(self.locate("GROUP")));
                    }
                    self.check_key_type(g, &input.schema, "GROUP BY")?;
                    keys.push(self.physical(g, &input.schema)?);
                }
            }
        }
        let Some((window_position, window, time_column)) = window else {
            return Err(PlanError::unsupported(
                "GROUP BY on an unbounded stream needs a window, or its results never end",
            )
            .at(self.locate("GROUP"))
            .hint("add TUMBLE(time, INTERVAL '1' MINUTE) (or HOP/SESSION) to the GROUP BY"));
        };
        let input_arrow = Arc::new(input.schema.as_arrow().clone());
        let planning_ctx = PhysicalPlanningContext::default();
        let mut aggregates = Vec::with_capacity(agg.aggr_expr.len());
        for e in &agg.aggr_expr {
            let lowered = LoweredAggregateBuilder::new(e, &input.schema, &input_arrow, &self.props, &planning_ctx)
                .build()
                .map_err(|err| PlanError::from_datafusion(err).at(self.stmt))?;
            if !lowered.order_bys.is_empty() {
                return Err(
                    PlanError::unsupported(format!("ORDER BY inside aggregate '{e}' is not supported")).at(self.stmt)
                );
            }
            aggregates.push(AggregateSpec { expr: lowered.aggregate, filter: lowered.filter });
        }
        let (partitioning, parallelism) = self.keys_partitioning(&keys);
        let schema = Arc::new(agg.schema.as_arrow().clone());
        let key_names: Vec<String> = agg
            .group_expr
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != window_position)
            .map(|(_, g)| g.to_string())
            .collect();
        let agg_names: Vec<String> = agg.aggr_expr.iter().map(|a| a.schema_name().to_string()).collect();
        let label = format!(
            "window {} by ({}) computing {}",
            window.describe(),
            key_names.join(", "),
            if agg_names.is_empty() { "distinct rows".to_string() } else { agg_names.join(", ") }
        );
        let spec =
            WindowAggregateSpec { window, time_column, window_position, keys, aggregates, input_schema: input_arrow };
        let node = self.add_node(label, OperatorSpec::WindowAggregate(spec), parallelism, schema, None);
        self.connect(input.node, node, partitioning);
        Ok(Stream { node, schema: agg.schema.clone(), event_time: None, row_numbers: HashMap::new(), parallelism })
    }

    /// `SELECT DISTINCT cols, TUMBLE_START(...)`: a windowed GROUP BY of all columns without aggregates.
    fn translate_distinct(&mut self, input: &Arc<LogicalPlan>) -> Result<Stream> {
        let no_window = || {
            PlanError::unsupported("SELECT DISTINCT on an unbounded stream needs a window").hint(
                "select a window bound as well: SELECT DISTINCT tenant, TUMBLE_START(time, INTERVAL '1' MINUTE) FROM t",
            )
        };
        let LogicalPlan::Projection(p) = input.as_ref() else {
            return Err(no_window().at(self.locate("DISTINCT")));
        };
        // Group by the window itself, then compute the projected window bound from it.
        let mut window_call: Option<Expr> = None;
        for e in &p.expr {
            let mut found = None;
            let _ = strip_alias(e).apply(|x| {
                if let Some(Ok(_)) = as_window_call(x) {
                    found = Some(x.clone());
                    return Ok(TreeNodeRecursion::Stop);
                }
                Ok(TreeNodeRecursion::Continue)
            });
            if let Some(f) = found {
                if window_call.as_ref().is_some_and(|w| *w != f) {
                    return Err(PlanError::unsupported("SELECT DISTINCT with two different windows")
                        .at(self.locate("DISTINCT")));
                }
                window_call = Some(f);
            }
        }
        let Some(window_call) = window_call else { return Err(no_window().at(self.locate("DISTINCT"))) };
        let mut group_expr: Vec<Expr> = vec![window_call.clone().alias("__window")];
        for e in &p.expr {
            if !contains_window_call(e) {
                group_expr.push(strip_alias(e).clone());
            }
        }
        let aggregate = Aggregate::try_new(p.input.clone(), group_expr, vec![]).map_err(PlanError::from_datafusion)?;
        let agg_schema = aggregate.schema.clone();
        let agg_plan = Arc::new(LogicalPlan::Aggregate(aggregate));
        // Each projected expression, rewritten over the aggregate's output.
        let mut next_key = 1;
        let mut final_exprs = Vec::with_capacity(p.expr.len());
        for (i, e) in p.expr.iter().enumerate() {
            let (qualifier, field) = p.schema.qualified_field(i);
            let name = field.name().clone();
            let rewritten = if contains_window_call(e) {
                let window_col = Expr::Column(datafusion::common::Column::from(agg_schema.qualified_field(0)));
                strip_alias(e)
                    .clone()
                    .transform(|x| {
                        Ok(if x == window_call {
                            datafusion::common::tree_node::Transformed::yes(window_col.clone())
                        } else {
                            datafusion::common::tree_node::Transformed::no(x)
                        })
                    })
                    .map_err(PlanError::from_datafusion)?
                    .data
            } else {
                let c = Expr::Column(datafusion::common::Column::from(agg_schema.qualified_field(next_key)));
                next_key += 1;
                c
            };
            final_exprs.push(rewritten.alias_qualified(qualifier.cloned(), name));
        }
        let projection = Projection::try_new(final_exprs, agg_plan).map_err(PlanError::from_datafusion)?;
        self.translate_projection(&projection)
    }

    fn translate_union(&mut self, u: &datafusion::logical_expr::Union) -> Result<Stream> {
        let inputs = u.inputs.iter().map(|i| self.translate(i)).collect::<Result<Vec<_>>>()?;
        let parallelism = self.settings.parallelism;
        let event_time =
            inputs.first().and_then(|s| s.event_time).filter(|et| inputs.iter().all(|s| s.event_time == Some(*et)));
        let schema = Arc::new(u.schema.as_arrow().clone());
        let node = self.add_node("union".to_string(), OperatorSpec::Union, parallelism, schema, event_time);
        for s in &inputs {
            if !s.row_numbers.is_empty() {
                return Err(PlanError::unsupported("ROW_NUMBER() across UNION").at(self.locate("UNION")));
            }
            let part = if s.parallelism == parallelism { Partitioning::Forward } else { Partitioning::RoundRobin };
            self.connect(s.node, node, part);
        }
        Ok(Stream { node, schema: u.schema.clone(), event_time, row_numbers: HashMap::new(), parallelism })
    }

    fn add_sink(&mut self, stream: Stream, insert: &InsertStmt, table: &Arc<TableDef>) -> Result<()> {
        let query_fields: Vec<Field> = stream.schema.fields().iter().map(|f| f.as_ref().clone()).collect();
        let select_locs = select_item_locations(&insert.query);
        let mut stream = stream;
        let target: SchemaRef = if table.has_columns {
            let sink_fields = table.schema.fields();
            // Which query column feeds each sink column (None: NULL).
            let mapping: Vec<Option<usize>> = if insert.columns.is_empty() {
                if query_fields.len() != sink_fields.len() {
                    return Err(PlanError::new(
                        PlanErrorKind::TypeMismatch,
                        format!(
                            "sink '{}' has {} columns but the query gives {}",
                            table.name,
                            sink_fields.len(),
                            query_fields.len()
                        ),
                    )
                    .at(insert.location)
                    .hint(format!("sink columns: {}", describe_columns(&table.schema))));
                }
                (0..sink_fields.len()).map(Some).collect()
            } else {
                if insert.columns.len() != query_fields.len() {
                    return Err(PlanError::new(
                        PlanErrorKind::TypeMismatch,
                        format!(
                            "INSERT lists {} columns but the query gives {}",
                            insert.columns.len(),
                            query_fields.len()
                        ),
                    )
                    .at(insert.location));
                }
                let mut m = vec![None; sink_fields.len()];
                for (qi, c) in insert.columns.iter().enumerate() {
                    let Some(si) = sink_fields.iter().position(|f| f.name() == c) else {
                        return Err(PlanError::unknown(format!("sink '{}' has no column '{c}'", table.name))
                            .at(insert.location));
                    };
                    m[si] = Some(qi);
                }
                for (si, f) in sink_fields.iter().enumerate() {
                    if m[si].is_none() && !f.is_nullable() {
                        return Err(PlanError::invalid(format!(
                            "sink column '{}' is NOT NULL but the INSERT does not set it",
                            f.name()
                        ))
                        .at(insert.location));
                    }
                }
                m
            };
            let mut exprs: Vec<Arc<dyn PhysicalExpr>> = Vec::with_capacity(sink_fields.len());
            let mut trivial = insert.columns.is_empty();
            for (si, sf) in sink_fields.iter().enumerate() {
                match mapping[si] {
                    Some(qi) => {
                        let qf = &query_fields[qi];
                        if !implicitly_castable(qf.data_type(), sf.data_type()) {
                            return Err(PlanError::new(
                                PlanErrorKind::TypeMismatch,
                                format!(
                                    "sink column '{}' is {} but the query gives {} ('{}')",
                                    sf.name(),
                                    crate::types::arrow_to_sql(sf.data_type()),
                                    crate::types::arrow_to_sql(qf.data_type()),
                                    qf.name()
                                ),
                            )
                            .at(select_locs.get(qi).copied().flatten().or(insert.location))
                            .hint(format!("cast it: CAST(... AS {})", crate::types::arrow_to_sql(sf.data_type()))));
                        }
                        let col: Arc<dyn PhysicalExpr> =
                            Arc::new(datafusion::physical_expr::expressions::Column::new(qf.name(), qi));
                        if qf.data_type() == sf.data_type() {
                            exprs.push(col);
                        } else {
                            trivial = false;
                            exprs.push(Arc::new(datafusion::physical_expr::expressions::CastExpr::new(
                                col,
                                sf.data_type().clone(),
                                None,
                            )));
                        }
                    }
                    None => {
                        let null = ScalarValue::try_from(sf.data_type()).map_err(PlanError::from_datafusion)?;
                        exprs.push(Arc::new(datafusion::physical_expr::expressions::Literal::new(null)));
                    }
                }
            }
            if !trivial {
                let node = self.add_node(
                    format!("cast to {}", table.name),
                    OperatorSpec::Calc(CalcSpec { filter: None, exprs: Some(exprs) }),
                    stream.parallelism,
                    table.schema.clone(),
                    None,
                );
                self.connect(stream.node, node, Partitioning::Forward);
                stream = Stream { node, event_time: None, ..stream };
            }
            table.schema.clone()
        } else {
            let mut seen = BTreeSet::new();
            for (i, f) in query_fields.iter().enumerate() {
                if !seen.insert(f.name().clone()) {
                    return Err(PlanError::invalid(format!("the query gives two columns named '{}'", f.name()))
                        .at(select_locs.get(i).copied().flatten().or(insert.location))
                        .hint("give them distinct names with AS"));
                }
            }
            Arc::new(Schema::new(query_fields))
        };

        if let Some(&sink) = self.sinks.get(&table.name) {
            let existing = self.graph.nodes[sink].schema.clone();
            if !schemas_match(&existing, &target) {
                return Err(PlanError::new(
                    PlanErrorKind::TypeMismatch,
                    format!(
                        "this INSERT gives ({}) but an earlier INSERT into '{}' gave ({})",
                        describe_columns(&target),
                        table.name,
                        describe_columns(&existing)
                    ),
                )
                .at(insert.location));
            }
            let part = if let Some(keyed) = self.sink_key_partitioning(table) {
                keyed
            } else if self.graph.nodes[sink].parallelism == stream.parallelism {
                Partitioning::Forward
            } else {
                Partitioning::RoundRobin
            };
            self.connect(stream.node, sink, part);
            return Ok(());
        }
        let label = format!("sink {} ({})", table.name, table.connector);
        let part = self.sink_key_partitioning(table).unwrap_or(Partitioning::Forward);
        // Upsert sinks: the last change per key per checkpoint, in front of the sink (INSERTs into the table join
        // there).
        let mut entry = None;
        if let Some(sequence) = self.collapsed_sinks.get(&table.name).cloned() {
            let index = |c: &String| {
                target.index_of(c).map_err(|_| PlanError::unknown(format!("sink '{}' has no column '{c}'", table.name)))
            };
            let keys = table.primary_key.iter().map(index).collect::<Result<Vec<_>>>()?;
            let seq = sequence.iter().map(index).collect::<Result<Vec<_>>>()?;
            let label = format!(
                "collapse by ({}) to the last change per checkpoint, ordered by ({})",
                table.primary_key.join(", "),
                sequence.join(", ")
            );
            let node = self.add_node(
                label,
                OperatorSpec::Collapse(CollapseSpec { keys, sequence: seq }),
                stream.parallelism,
                target.clone(),
                None,
            );
            self.connect(stream.node, node, part.clone());
            entry = Some(node);
        }
        let node = self.add_node(
            label,
            OperatorSpec::Sink(SinkSpec { table: table.clone() }),
            stream.parallelism,
            target,
            None,
        );
        match entry {
            Some(collapse) => self.connect(collapse, node, Partitioning::Forward),
            None => self.connect(stream.node, node, part),
        }
        self.sinks.insert(table.name.clone(), entry.unwrap_or(node));
        Ok(())
    }

    /// Hash partitioning by the table's PRIMARY KEY, for sinks whose connector asks for it.
    fn sink_key_partitioning(&self, table: &TableDef) -> Option<Partitioning> {
        if !self.keyed_sinks.contains(&table.name) {
            return None;
        }
        let keys = table
            .primary_key
            .iter()
            .filter_map(|k| table.schema.index_of(k).ok().map(|i| (k, i)))
            .map(|(k, i)| Arc::new(datafusion::physical_expr::expressions::Column::new(k, i)) as Arc<dyn PhysicalExpr>)
            .collect();
        Some(Partitioning::Hash { keys })
    }
}

/// If `e` is `rn = 1` (or `rn <= 1`, `rn < 2`, `1 = rn`), the column index of `rn`.
fn row_number_is_one(e: &Expr, schema: &DFSchema) -> Option<usize> {
    let Expr::BinaryExpr(BinaryExpr { left, op, right }) = e else { return None };
    let (col, lit, op) = match (strip_cast(left), strip_cast(right)) {
        (Expr::Column(c), Expr::Literal(v, _)) => (c, v, *op),
        (Expr::Literal(v, _), Expr::Column(c)) => (c, v, op.swap()?),
        _ => return None,
    };
    let n = match lit {
        ScalarValue::Int64(Some(n)) => *n as i128,
        ScalarValue::UInt64(Some(n)) => *n as i128,
        ScalarValue::Int32(Some(n)) => *n as i128,
        ScalarValue::UInt32(Some(n)) => *n as i128,
        ScalarValue::Int16(Some(n)) => *n as i128,
        ScalarValue::Int8(Some(n)) => *n as i128,
        ScalarValue::UInt8(Some(n)) => *n as i128,
        ScalarValue::UInt16(Some(n)) => *n as i128,
        _ => return None,
    };
    let ok = matches!((op, n), (Operator::Eq, 1) | (Operator::LtEq, 1) | (Operator::Lt, 2));
    if !ok {
        return None;
    }
    schema.index_of_column(col).ok()
}

fn strip_cast(e: &Expr) -> &Expr {
    match e {
        Expr::Cast(c) => strip_cast(&c.expr),
        Expr::TryCast(c) => strip_cast(&c.expr),
        Expr::Alias(a) => strip_cast(&a.expr),
        other => other,
    }
}

/// Casts the planner inserts silently between a query column and a sink column: widening within a type family.
fn implicitly_castable(from: &DataType, to: &DataType) -> bool {
    use DataType::*;
    if from == to || matches!(from, Null) {
        return true;
    }
    let int = |t: &DataType| t.is_integer();
    let float = |t: &DataType| matches!(t, Float16 | Float32 | Float64);
    let dec = |t: &DataType| matches!(t, Decimal32(_, _) | Decimal64(_, _) | Decimal128(_, _) | Decimal256(_, _));
    let text = |t: &DataType| matches!(t, Utf8 | LargeUtf8 | Utf8View);
    let bin = |t: &DataType| matches!(t, Binary | LargeBinary | BinaryView);
    match (from, to) {
        (f, t) if int(f) && (int(t) || float(t) || dec(t)) => true,
        (f, t) if float(f) && float(t) => true,
        (f, t) if dec(f) && (dec(t) || float(t)) => true,
        (f, t) if text(f) && text(t) => true,
        (f, t) if bin(f) && bin(t) => true,
        (Timestamp(_, _), Timestamp(_, _)) | (Date32 | Date64, Timestamp(_, _) | Date32 | Date64) => true,
        (List(a), List(b)) | (LargeList(a), List(b)) | (List(a), LargeList(b)) => {
            implicitly_castable(a.data_type(), b.data_type())
        }
        (Struct(a), Struct(b)) => {
            a.len() == b.len()
                && a.iter()
                    .zip(b.iter())
                    .all(|(x, y)| x.name() == y.name() && implicitly_castable(x.data_type(), y.data_type()))
        }
        _ => false,
    }
}

fn schemas_match(a: &Schema, b: &Schema) -> bool {
    a.fields().len() == b.fields().len()
        && a.fields().iter().zip(b.fields().iter()).all(|(x, y)| x.name() == y.name() && x.data_type() == y.data_type())
}

fn describe_columns(schema: &Schema) -> String {
    schema
        .fields()
        .iter()
        .map(|f| format!("{} {}", f.name(), crate::types::arrow_to_sql(f.data_type())))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Start of each SELECT item of the query's top-level SELECT.
fn select_item_locations(query: &sql::Query) -> Vec<Option<Location>> {
    match query.body.as_ref() {
        SetExpr::Select(s) => s.projection.iter().map(|p| Location::from_span(p.span())).collect(),
        _ => Vec::new(),
    }
}
