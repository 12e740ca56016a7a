//! Logical plans to dataflow nodes: sources, projections, filters, windows, aggregates, dedups and unions.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use arrow::datatypes::{DataType, SchemaRef};
use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
use datafusion::common::{DFSchema, DFSchemaRef, ScalarValue};
use datafusion::execution::context::{ExecutionProps, SessionContext};
use datafusion::logical_expr::ExprSchemable;
use datafusion::logical_expr::expr::WindowFunction;
use datafusion::logical_expr::physical_planning_context::PhysicalPlanningContext;
use datafusion::logical_expr::utils::conjunction;
use datafusion::logical_expr::utils::split_conjunction;
use datafusion::logical_expr::{Aggregate, BinaryExpr, Distinct, Expr, LogicalPlan, Operator, Projection, SortExpr};
use datafusion::physical_expr::aggregate::LoweredAggregateBuilder;
use datafusion::physical_expr::{PhysicalExpr, create_physical_expr};

use super::locate::WordIndex;
use super::sink::describe_columns;
use crate::catalog::TableDef;
use crate::error::{Location, PlanError, PlanErrorKind, Result};
use crate::graph::{
    AggregateSpec, CalcSpec, DataflowGraph, DedupScope, DedupSpec, Edge, Keep, Node, NodeId, OperatorSpec,
    Partitioning, Settings, SourceSpec, WatermarkSpec, WindowAggregateSpec,
};
use crate::preprocess::WatermarkClause;
use crate::window::{WindowKind, as_window_call, contains_window_call, strip_alias};

/// A translated plan node: where its rows come from and what they look like.
#[derive(Clone)]
pub(super) struct Stream {
    pub(super) node: NodeId,
    pub(super) schema: DFSchemaRef,
    pub(super) event_time: Option<usize>,
    /// Columns holding a ROW_NUMBER() of a dedup candidate (column → index in `dedups`).
    pub(super) row_numbers: HashMap<usize, usize>,
    pub(super) parallelism: usize,
}

pub(super) struct DedupCandidate {
    pub(super) confirmed: bool,
    pub(super) location: Option<Location>,
}

pub(super) struct Translator<'a> {
    pub(super) settings: &'a Settings,
    pub(super) tables: &'a BTreeMap<String, Arc<TableDef>>,
    pub(super) graph: DataflowGraph,
    pub(super) sources: HashMap<String, (NodeId, Vec<usize>)>,
    pub(super) sinks: HashMap<String, NodeId>,
    pub(super) dedups: Vec<DedupCandidate>,
    pub(super) props: ExecutionProps,
    pub(super) words: &'a WordIndex,
    pub(super) stmt: Option<Location>,
    /// Sinks whose input is partitioned by their PRIMARY KEY.
    pub(super) keyed_sinks: BTreeSet<String>,
    /// Keyed sinks that take one image per key per checkpoint, with the columns ordering a key's changes.
    pub(super) collapsed_sinks: BTreeMap<String, Vec<String>>,
}

impl Translator<'_> {
    pub(super) fn add_node(
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

    pub(super) fn connect(&mut self, from: NodeId, to: NodeId, partitioning: Partitioning) {
        self.graph.edges.push(Edge { from, to, partitioning });
    }

    pub(super) fn physical(&self, expr: &Expr, schema: &DFSchema) -> Result<Arc<dyn PhysicalExpr>> {
        create_physical_expr(expr, schema, &self.props, &PhysicalPlanningContext::default())
            .map_err(PlanError::from_datafusion)
    }

    pub(super) fn locate(&self, word: &str) -> Option<Location> {
        self.words.find(word, self.stmt).or(self.stmt)
    }

    pub(super) async fn add_source(
        &mut self,
        ctx: &SessionContext,
        table: &Arc<TableDef>,
        cols: &BTreeSet<usize>,
    ) -> Result<()> {
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

    pub(super) async fn watermark_spec(
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

    pub(super) fn translate(&mut self, plan: &LogicalPlan) -> Result<Stream> {
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

    pub(super) fn translate_scan(&mut self, scan: &datafusion::logical_expr::TableScan) -> Result<Stream> {
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

    pub(super) fn check_row_wise(&self, expr: &Expr) -> Result<()> {
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

    pub(super) fn translate_projection(&mut self, p: &Projection) -> Result<Stream> {
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

    pub(super) fn translate_filter(&mut self, predicate: &Expr, input_plan: &LogicalPlan) -> Result<Stream> {
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

    pub(super) fn require_event_time(&self, input: &Stream, time: &Expr, what: &str) -> Result<usize> {
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

    pub(super) fn keys_partitioning(&self, keys: &[Arc<dyn PhysicalExpr>]) -> (Partitioning, usize) {
        if keys.is_empty() {
            (Partitioning::Single, 1)
        } else {
            (Partitioning::Hash { keys: keys.to_vec() }, self.settings.parallelism)
        }
    }

    pub(super) fn check_key_type(&self, e: &Expr, schema: &DFSchema, what: &str) -> Result<()> {
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

    pub(super) fn translate_window(&mut self, w: &datafusion::logical_expr::Window) -> Result<Stream> {
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

    pub(super) fn translate_aggregate(&mut self, agg: &Aggregate) -> Result<Stream> {
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
    pub(super) fn translate_distinct(&mut self, input: &Arc<LogicalPlan>) -> Result<Stream> {
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

    pub(super) fn translate_union(&mut self, u: &datafusion::logical_expr::Union) -> Result<Stream> {
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
}

/// If `e` is `rn = 1` (or `rn <= 1`, `rn < 2`, `1 = rn`), the column index of `rn`.
pub(super) fn row_number_is_one(e: &Expr, schema: &DFSchema) -> Option<usize> {
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

pub(super) fn strip_cast(e: &Expr) -> &Expr {
    match e {
        Expr::Cast(c) => strip_cast(&c.expr),
        Expr::TryCast(c) => strip_cast(&c.expr),
        Expr::Alias(a) => strip_cast(&a.expr),
        other => other,
    }
}
