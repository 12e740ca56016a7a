//! SQL text to a [`Pipeline`]: statements are parsed with sqlparser, queries planned and type-checked by DataFusion,
//! and the resulting logical plans translated into a dataflow graph of streaming operators.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::ControlFlow;
use std::sync::Arc;

use datafusion::common::TableReference;
use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
use datafusion::datasource::empty::EmptyTable;
use datafusion::execution::SessionStateBuilder;
use datafusion::execution::context::{ExecutionProps, SessionConfig, SessionContext};
use datafusion::logical_expr::LogicalPlan;
use datafusion::optimizer::optimize_projections::OptimizeProjections;
use datafusion::sql::parser::Statement as DFStatement;
use datafusion::sql::sqlparser::ast::{
    self as sql, Expr as SqlExpr, FunctionArg, FunctionArgExpr, FunctionArgumentList, FunctionArguments, Ident,
    ObjectName, Spanned, Statement, TableObject, Value, VisitMut, VisitorMut,
};
use datafusion::sql::sqlparser::dialect::GenericDialect;
use datafusion::sql::sqlparser::parser::Parser;

use crate::catalog::{ConnectorCatalog, TableDef, TableRole, Variables, normalize_object_name};
use crate::error::{Location, PlanError, PlanErrorKind, Result};
use crate::graph::{DataflowGraph, Pipeline};
use crate::preprocess::{WatermarkClause, preprocess};
use crate::window::{split_bound_function, window_udfs};

mod locate;
mod settings;
mod sink;
mod translate;

use locate::WordIndex;
pub use settings::SETTINGS;
use settings::SettingsBuilder;
use translate::Translator;

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
        let warnings = redelivery_warnings(&graph, &self.connectors);
        Ok(Pipeline { settings, tables, graph, warnings })
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

/// Warnings for at-least-once sources: a path to a sink without a dedup writes a redelivered message twice, and a
/// dedup that forgets a key before the source may deliver it again lets the copy through.
fn redelivery_warnings(graph: &crate::graph::DataflowGraph, connectors: &ConnectorCatalog) -> Vec<String> {
    use crate::graph::{DedupScope, OperatorSpec};
    let mut out = Vec::new();
    for node in &graph.nodes {
        let OperatorSpec::Source(spec) = &node.operator else { continue };
        let Some(window) = connectors.get(&spec.table.connector).and_then(|c| c.redelivery_window(&spec.table)) else {
            continue;
        };
        let source = &spec.table.name;
        let mut seen = vec![false; graph.nodes.len()];
        let mut stack = vec![node.id];
        while let Some(id) = stack.pop() {
            for e in graph.outputs(id) {
                if std::mem::replace(&mut seen[e.to], true) {
                    continue;
                }
                match &graph.nodes[e.to].operator {
                    OperatorSpec::Dedup(d) => {
                        let remembers = match d.scope {
                            DedupScope::Ttl { ttl_us } | DedupScope::Window { size_us: ttl_us } => {
                                std::time::Duration::from_micros(ttl_us.max(0) as u64)
                            }
                        };
                        if remembers < window {
                            out.push(format!(
                                "source '{source}' ({}) may deliver a message again up to {} later (its visibility \
                                 timeout, before any restart), but the dedup after it remembers a key for {}: set \
                                 dedup_ttl longer than the visibility timeout plus a restart",
                                spec.table.connector,
                                nagare_core::format_duration(window),
                                nagare_core::format_duration(remembers)
                            ));
                        }
                    }
                    OperatorSpec::Sink(s) => out.push(format!(
                        "source '{source}' ({}) delivers at least once and reaches sink '{}' without a dedup: a \
                         redelivered message is written twice; dedup by the event's id, e.g. SELECT ... FROM (SELECT \
                         *, ROW_NUMBER() OVER (PARTITION BY id ORDER BY time) AS rn FROM {source}) WHERE rn = 1",
                        spec.table.connector, s.table.name
                    )),
                    _ => stack.push(e.to),
                }
            }
        }
    }
    out
}

/// The DataFusion session the planner (and a shipped plan's reader) binds functions in.
pub(crate) fn session(tables: &BTreeMap<String, Arc<TableDef>>) -> Result<SessionContext> {
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
