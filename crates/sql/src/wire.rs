//! A planned pipeline as data: what the coordinator stores in the job record and sends to workers, so that every
//! worker of a job runs the plan the coordinator made (no re-planning, no `${VAR}` filled from a worker's own
//! environment).
//!
//! The document is JSON; schemas and DataFusion physical expressions inside it are `datafusion-proto` messages
//! (base64). Aggregates are carried as their function's name, arguments and flags, and built again with
//! DataFusion's `AggregateExprBuilder` against the same function registry the planner uses.

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::datatypes::{Schema, SchemaRef};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use datafusion::execution::TaskContext;
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_expr::aggregate::AggregateExprBuilder;
use datafusion_proto::physical_plan::DefaultPhysicalExtensionCodec;
use datafusion_proto::physical_plan::from_proto::parse_physical_expr;
use datafusion_proto::physical_plan::to_proto::serialize_physical_expr;
use datafusion_proto::protobuf;
use prost::Message;
use serde::{Deserialize, Serialize};

use crate::catalog::TableDef;
use crate::error::{PlanError, Result};
use crate::graph::{
    AggregateSpec, CalcSpec, CollapseSpec, DataflowGraph, DedupScope, DedupSpec, Edge, Keep, Node, OperatorSpec,
    Partitioning, Pipeline, Settings, SinkSpec, SourceSpec, WatermarkSpec, WindowAggregateSpec,
};
use crate::window::WindowKind;

/// Version of the document; a reader refuses others rather than misread them.
const VERSION: u32 = 1;

#[derive(Serialize, Deserialize)]
struct WirePipeline {
    version: u32,
    settings: Settings,
    tables: BTreeMap<String, WireTable>,
    nodes: Vec<WireNode>,
    edges: Vec<WireEdge>,
}

#[derive(Serialize, Deserialize)]
struct WireTable {
    name: String,
    connector: String,
    schema: String,
    has_columns: bool,
    watermark: Option<crate::preprocess::WatermarkClause>,
    primary_key: Vec<String>,
    options: crate::options::Options,
    config: serde_json::Value,
    location: Option<crate::error::Location>,
}

#[derive(Serialize, Deserialize)]
struct WireNode {
    id: usize,
    label: String,
    operator: WireOperator,
    parallelism: usize,
    schema: String,
    event_time: Option<usize>,
}

#[derive(Serialize, Deserialize)]
enum WireOperator {
    Source {
        table: String,
        projection: Vec<usize>,
        watermark: Option<WireWatermark>,
    },
    Calc {
        filter: Option<String>,
        exprs: Option<Vec<String>>,
    },
    Dedup {
        keys: Vec<String>,
        key_names: Vec<String>,
        time_column: usize,
        keep: Keep,
        scope: DedupScope,
    },
    WindowAggregate {
        window: WindowKind,
        time_column: usize,
        window_position: usize,
        keys: Vec<String>,
        aggregates: Vec<WireAggregate>,
        input_schema: String,
    },
    Union,
    Collapse(CollapseSpec),
    Sink {
        table: String,
    },
}

#[derive(Serialize, Deserialize)]
struct WireWatermark {
    column: usize,
    expr: String,
    text: String,
}

#[derive(Serialize, Deserialize)]
struct WireAggregate {
    function: String,
    args: Vec<String>,
    name: String,
    human_display: Option<String>,
    distinct: bool,
    ignore_nulls: bool,
    filter: Option<String>,
}

#[derive(Serialize, Deserialize)]
struct WireEdge {
    from: usize,
    to: usize,
    partitioning: WirePartitioning,
}

#[derive(Serialize, Deserialize)]
enum WirePartitioning {
    Forward,
    Hash { keys: Vec<String> },
    Single,
    RoundRobin,
}

fn internal(what: &str, e: impl std::fmt::Display) -> PlanError {
    PlanError::internal(format!("shipped plan: {what}: {e}"))
}

fn schema_out(schema: &Schema) -> Result<String> {
    let p = protobuf::Schema::try_from(schema).map_err(|e| internal("schema", e))?;
    Ok(B64.encode(p.encode_to_vec()))
}

fn schema_in(text: &str) -> Result<SchemaRef> {
    let bytes = B64.decode(text).map_err(|e| internal("schema", e))?;
    let p = protobuf::Schema::decode(bytes.as_slice()).map_err(|e| internal("schema", e))?;
    Ok(Arc::new(Schema::try_from(&p).map_err(|e| internal("schema", e))?))
}

fn expr_out(e: &Arc<dyn PhysicalExpr>) -> Result<String> {
    let node =
        serialize_physical_expr(e, &DefaultPhysicalExtensionCodec {}).map_err(|err| internal("expression", err))?;
    Ok(B64.encode(node.encode_to_vec()))
}

fn exprs_out(es: &[Arc<dyn PhysicalExpr>]) -> Result<Vec<String>> {
    es.iter().map(expr_out).collect()
}

/// Writes a planned pipeline as a document a [`decode`] elsewhere turns back into the same plan.
pub fn encode(pipeline: &Pipeline) -> Result<String> {
    let tables = pipeline
        .tables
        .iter()
        .map(|(name, t)| {
            Ok((
                name.clone(),
                WireTable {
                    name: t.name.clone(),
                    connector: t.connector.clone(),
                    schema: schema_out(&t.schema)?,
                    has_columns: t.has_columns,
                    watermark: t.watermark.clone(),
                    primary_key: t.primary_key.clone(),
                    options: t.options.clone(),
                    config: t.config.clone(),
                    location: t.location,
                },
            ))
        })
        .collect::<Result<BTreeMap<_, _>>>()?;
    let nodes = pipeline
        .graph
        .nodes
        .iter()
        .map(|n| {
            let operator = match &n.operator {
                OperatorSpec::Source(s) => WireOperator::Source {
                    table: s.table.name.clone(),
                    projection: s.projection.clone(),
                    watermark: s
                        .watermark
                        .as_ref()
                        .map(|w| {
                            Ok::<_, PlanError>(WireWatermark {
                                column: w.column,
                                expr: expr_out(&w.expr)?,
                                text: w.text.clone(),
                            })
                        })
                        .transpose()?,
                },
                OperatorSpec::Calc(c) => WireOperator::Calc {
                    filter: c.filter.as_ref().map(expr_out).transpose()?,
                    exprs: c.exprs.as_deref().map(exprs_out).transpose()?,
                },
                OperatorSpec::Dedup(d) => WireOperator::Dedup {
                    keys: exprs_out(&d.keys)?,
                    key_names: d.key_names.clone(),
                    time_column: d.time_column,
                    keep: d.keep,
                    scope: d.scope,
                },
                OperatorSpec::WindowAggregate(w) => WireOperator::WindowAggregate {
                    window: w.window,
                    time_column: w.time_column,
                    window_position: w.window_position,
                    keys: exprs_out(&w.keys)?,
                    aggregates: w
                        .aggregates
                        .iter()
                        .map(|a| {
                            Ok(WireAggregate {
                                function: a.expr.fun().name().to_string(),
                                args: exprs_out(&a.expr.expressions())?,
                                name: a.expr.name().to_string(),
                                human_display: a.expr.human_display().map(str::to_string),
                                distinct: a.expr.is_distinct(),
                                ignore_nulls: a.expr.ignore_nulls(),
                                filter: a.filter.as_ref().map(expr_out).transpose()?,
                            })
                        })
                        .collect::<Result<_>>()?,
                    input_schema: schema_out(&w.input_schema)?,
                },
                OperatorSpec::Union => WireOperator::Union,
                OperatorSpec::Collapse(c) => WireOperator::Collapse(c.clone()),
                OperatorSpec::Sink(s) => WireOperator::Sink { table: s.table.name.clone() },
            };
            Ok(WireNode {
                id: n.id,
                label: n.label.clone(),
                operator,
                parallelism: n.parallelism,
                schema: schema_out(&n.schema)?,
                event_time: n.event_time,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let edges = pipeline
        .graph
        .edges
        .iter()
        .map(|e| {
            let partitioning = match &e.partitioning {
                Partitioning::Forward => WirePartitioning::Forward,
                Partitioning::Hash { keys } => WirePartitioning::Hash { keys: exprs_out(keys)? },
                Partitioning::Single => WirePartitioning::Single,
                Partitioning::RoundRobin => WirePartitioning::RoundRobin,
            };
            Ok(WireEdge { from: e.from, to: e.to, partitioning })
        })
        .collect::<Result<Vec<_>>>()?;
    let doc = WirePipeline { version: VERSION, settings: pipeline.settings.clone(), tables, nodes, edges };
    serde_json::to_string(&doc).map_err(|e| internal("document", e))
}

/// Reads back what [`encode`] wrote: the same graph, its expressions bound to the same functions.
pub fn decode(text: &str) -> Result<Pipeline> {
    let doc: WirePipeline = serde_json::from_str(text).map_err(|e| internal("document", e))?;
    if doc.version != VERSION {
        return Err(PlanError::invalid(format!(
            "the job's plan was written in format {} and this nagare reads format {VERSION}: run the same nagare \
             version on the coordinator and the workers",
            doc.version
        )));
    }
    let ctx = crate::planner::session(&BTreeMap::new())?.task_ctx();
    let mut tables: BTreeMap<String, Arc<TableDef>> = BTreeMap::new();
    for (name, t) in doc.tables {
        let def = TableDef {
            name: t.name,
            connector: t.connector,
            schema: schema_in(&t.schema)?,
            has_columns: t.has_columns,
            watermark: t.watermark,
            primary_key: t.primary_key,
            options: t.options,
            raw_options: Vec::new(),
            config: t.config,
            location: t.location,
        };
        tables.insert(name, Arc::new(def));
    }
    let table = |name: &str| {
        tables.get(name).cloned().ok_or_else(|| internal("table", format!("no table '{name}' in the plan")))
    };
    let schemas: Vec<SchemaRef> = doc.nodes.iter().map(|n| schema_in(&n.schema)).collect::<Result<_>>()?;
    let schema_of = |id: usize| schemas.get(id).cloned().ok_or_else(|| internal("graph", format!("no node {id}")));
    // The schema a node's expressions read: its (first) input's output.
    let input_of = |id: usize| match doc.edges.iter().find(|e| e.to == id) {
        Some(e) => schema_of(e.from),
        None => Err(internal("graph", format!("node {id} has no input"))),
    };
    let mut nodes = Vec::with_capacity(doc.nodes.len());
    for n in &doc.nodes {
        let operator = match &n.operator {
            WireOperator::Source { table: t, projection, watermark } => {
                let own = schema_of(n.id)?;
                OperatorSpec::Source(SourceSpec {
                    table: table(t)?,
                    projection: projection.clone(),
                    watermark: watermark
                        .as_ref()
                        .map(|w| {
                            Ok::<_, PlanError>(WatermarkSpec {
                                column: w.column,
                                expr: expr_in(&w.expr, &own, &ctx)?,
                                text: w.text.clone(),
                            })
                        })
                        .transpose()?,
                })
            }
            WireOperator::Calc { filter, exprs } => {
                let input = input_of(n.id)?;
                OperatorSpec::Calc(CalcSpec {
                    filter: filter.as_deref().map(|f| expr_in(f, &input, &ctx)).transpose()?,
                    exprs: exprs.as_deref().map(|es| exprs_in(es, &input, &ctx)).transpose()?,
                })
            }
            WireOperator::Dedup { keys, key_names, time_column, keep, scope } => {
                let input = input_of(n.id)?;
                OperatorSpec::Dedup(DedupSpec {
                    keys: exprs_in(keys, &input, &ctx)?,
                    key_names: key_names.clone(),
                    time_column: *time_column,
                    keep: *keep,
                    scope: *scope,
                })
            }
            WireOperator::WindowAggregate { window, time_column, window_position, keys, aggregates, input_schema } => {
                let input = schema_in(input_schema)?;
                let aggregates =
                    aggregates.iter().map(|a| aggregate_in(a, &input, &ctx)).collect::<Result<Vec<_>>>()?;
                OperatorSpec::WindowAggregate(WindowAggregateSpec {
                    window: *window,
                    time_column: *time_column,
                    window_position: *window_position,
                    keys: exprs_in(keys, &input, &ctx)?,
                    aggregates,
                    input_schema: input,
                })
            }
            WireOperator::Union => OperatorSpec::Union,
            WireOperator::Collapse(c) => OperatorSpec::Collapse(c.clone()),
            WireOperator::Sink { table: t } => OperatorSpec::Sink(SinkSpec { table: table(t)? }),
        };
        nodes.push(Node {
            id: n.id,
            label: n.label.clone(),
            operator,
            parallelism: n.parallelism,
            schema: schema_of(n.id)?,
            event_time: n.event_time,
        });
    }
    let edges = doc
        .edges
        .iter()
        .map(|e| {
            let partitioning = match &e.partitioning {
                WirePartitioning::Forward => Partitioning::Forward,
                WirePartitioning::Hash { keys } => {
                    let upstream = schema_of(e.from)?;
                    Partitioning::Hash { keys: exprs_in(keys, &upstream, &ctx)? }
                }
                WirePartitioning::Single => Partitioning::Single,
                WirePartitioning::RoundRobin => Partitioning::RoundRobin,
            };
            Ok(Edge { from: e.from, to: e.to, partitioning })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Pipeline { settings: doc.settings, tables, graph: DataflowGraph { nodes, edges }, warnings: Vec::new() })
}

fn expr_in(text: &str, schema: &Schema, ctx: &TaskContext) -> Result<Arc<dyn PhysicalExpr>> {
    let bytes = B64.decode(text).map_err(|e| internal("expression", e))?;
    let node = protobuf::PhysicalExprNode::decode(bytes.as_slice()).map_err(|e| internal("expression", e))?;
    parse_physical_expr(&node, ctx, schema, &DefaultPhysicalExtensionCodec {}).map_err(|e| internal("expression", e))
}

fn exprs_in(texts: &[String], schema: &Schema, ctx: &TaskContext) -> Result<Vec<Arc<dyn PhysicalExpr>>> {
    texts.iter().map(|t| expr_in(t, schema, ctx)).collect()
}

fn aggregate_in(a: &WireAggregate, input: &SchemaRef, ctx: &TaskContext) -> Result<AggregateSpec> {
    use datafusion::execution::FunctionRegistry as _;
    let udaf = ctx.udaf(&a.function).map_err(|e| internal("aggregate", e))?;
    let mut builder = AggregateExprBuilder::new(udaf, exprs_in(&a.args, input, ctx)?)
        .schema(input.clone())
        .alias(a.name.clone())
        .with_distinct(a.distinct)
        .with_ignore_nulls(a.ignore_nulls);
    if let Some(h) = &a.human_display {
        builder = builder.human_display(h.clone());
    }
    Ok(AggregateSpec {
        expr: Arc::new(builder.build().map_err(|e| internal("aggregate", e))?),
        filter: a.filter.as_deref().map(|f| expr_in(f, input, ctx)).transpose()?,
    })
}
