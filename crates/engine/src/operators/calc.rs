//! Row-wise filter and projection with DataFusion physical expressions.

use std::sync::Arc;

use arrow::array::AsArray;
use arrow::compute::filter_record_batch;
use arrow::datatypes::SchemaRef;
use arrow::record_batch::{RecordBatch, RecordBatchOptions};
use datafusion::physical_expr::PhysicalExpr;
use nagare_sql::CalcSpec;

use crate::error::{EngineError, Result};
use crate::operator::Operator;

/// Filter then project, batch at a time.
pub struct CalcOperator {
    filter: Option<Arc<dyn PhysicalExpr>>,
    exprs: Option<Vec<Arc<dyn PhysicalExpr>>>,
    schema: SchemaRef,
}

impl CalcOperator {
    /// An operator for `spec` producing `schema`.
    pub fn new(spec: &CalcSpec, schema: SchemaRef) -> Self {
        CalcOperator { filter: spec.filter.clone(), exprs: spec.exprs.clone(), schema }
    }
}

impl Operator for CalcOperator {
    fn process(&mut self, batch: RecordBatch, out: &mut Vec<RecordBatch>) -> Result<()> {
        let batch = match &self.filter {
            Some(f) => {
                let mask = f.evaluate(&batch)?.into_array(batch.num_rows())?;
                let mask =
                    mask.as_boolean_opt().ok_or_else(|| EngineError::Internal(format!("filter {f} is not boolean")))?;
                if mask.true_count() == batch.num_rows() { batch } else { filter_record_batch(&batch, mask)? }
            }
            None => batch,
        };
        if batch.num_rows() == 0 {
            return Ok(());
        }
        let result = match &self.exprs {
            Some(exprs) => {
                let n = batch.num_rows();
                let cols = exprs
                    .iter()
                    .map(|e| e.evaluate(&batch).and_then(|v| v.into_array(n)))
                    .collect::<Result<Vec<_>, _>>()?;
                RecordBatch::try_new_with_options(
                    self.schema.clone(),
                    cols,
                    &RecordBatchOptions::new().with_row_count(Some(n)),
                )?
            }
            None => RecordBatch::try_new(self.schema.clone(), batch.columns().to_vec())?,
        };
        out.push(result);
        Ok(())
    }
}
