//! The end of each INSERT: the query's columns matched to the sink's, casts, key partitioning and collapse.

use std::collections::BTreeSet;
use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::common::ScalarValue;
use datafusion::physical_expr::PhysicalExpr;

use super::InsertStmt;
use super::locate::select_item_locations;
use super::translate::{Stream, Translator};
use crate::catalog::TableDef;
use crate::error::{PlanError, PlanErrorKind, Result};
use crate::graph::{CalcSpec, CollapseSpec, OperatorSpec, Partitioning, SinkSpec};

impl Translator<'_> {
    pub(super) fn add_sink(&mut self, stream: Stream, insert: &InsertStmt, table: &Arc<TableDef>) -> Result<()> {
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
    pub(super) fn sink_key_partitioning(&self, table: &TableDef) -> Option<Partitioning> {
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

/// Casts the planner inserts silently between a query column and a sink column: widening within a type family.
pub(super) fn implicitly_castable(from: &DataType, to: &DataType) -> bool {
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

pub(super) fn schemas_match(a: &Schema, b: &Schema) -> bool {
    a.fields().len() == b.fields().len()
        && a.fields().iter().zip(b.fields().iter()).all(|(x, y)| x.name() == y.name() && x.data_type() == y.data_type())
}

pub(super) fn describe_columns(schema: &Schema) -> String {
    schema
        .fields()
        .iter()
        .map(|f| format!("{} {}", f.name(), crate::types::arrow_to_sql(f.data_type())))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use arrow::datatypes::{Field, TimeUnit};

    use super::*;

    #[test]
    fn only_widening_casts_are_implicit() {
        use DataType::*;
        for (from, to) in [
            (Int32, Int64),
            (Int64, Float64),
            (Int16, Decimal128(10, 0)),
            (Float32, Float64),
            (Utf8, LargeUtf8),
            (Null, Utf8),
            (Date32, Timestamp(TimeUnit::Microsecond, None)),
        ] {
            assert!(implicitly_castable(&from, &to), "{from} -> {to}");
        }
        for (from, to) in [(Float64, Int64), (Utf8, Int64), (Int64, Utf8), (Boolean, Int32), (Binary, Utf8)] {
            assert!(!implicitly_castable(&from, &to), "{from} -> {to} needs a CAST");
        }
        let s = |t: DataType| Struct(vec![Field::new("a", t, true)].into());
        assert!(implicitly_castable(&s(Int32), &s(Int64)));
        let renamed = Struct(vec![Field::new("b", Int64, true)].into());
        assert!(!implicitly_castable(&s(Int32), &renamed), "struct fields match by name");
        let list = |t: DataType| List(Field::new_list_field(t, true).into());
        assert!(implicitly_castable(&list(Int32), &list(Int64)));
    }

    #[test]
    fn columns_are_described_in_sql_types() {
        let schema = Schema::new(vec![Field::new("id", DataType::Utf8, true), Field::new("n", DataType::Int64, true)]);
        assert_eq!(describe_columns(&schema), "id TEXT, n BIGINT");
    }
}
