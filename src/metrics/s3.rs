//! S3 request metrics from inside the SDK: an interceptor sees every operation once (count,
//! outcome, latency with retries) and every attempt (retries, body bytes sent), whichever
//! [`crate::store::S3Store`] method sent it.

use std::time::Instant;

use aws_sdk_s3::config::interceptors::{
    BeforeSerializationInterceptorContextRef, BeforeTransmitInterceptorContextRef,
    FinalizerInterceptorContextRef,
};
use aws_sdk_s3::config::{ConfigBag, Intercept, RuntimeComponents};
use aws_smithy_runtime_api::box_error::BoxError;
use aws_smithy_runtime_api::client::orchestrator::Metadata;
use aws_smithy_types::config_bag::{Storable, StoreReplace};

use super::{S3Labels, S3OpLabels, get};

/// The interceptor; add it to an SDK client's config (`S3Store` does).
#[derive(Debug, Clone, Copy, Default)]
pub struct S3Metrics;

/// Per-operation state kept in the request's config bag.
#[derive(Debug, Clone)]
struct Started {
    at: Instant,
    attempts: u32,
}

impl Storable for Started {
    type Storer = StoreReplace<Self>;
}

fn operation(cfg: &ConfigBag) -> String {
    cfg.load::<Metadata>()
        .map_or_else(|| "unknown".to_owned(), |m| m.name().to_owned())
}

/// How an S3 request ended, by HTTP status (`None`: no response — connection refused or
/// reset, timeout, a body that failed mid-way).
pub fn outcome(status: Option<u16>) -> &'static str {
    match status {
        Some(200..=299) => "ok",
        Some(304) | Some(412) => "precondition_failed",
        Some(404) => "not_found",
        Some(403) => "forbidden",
        Some(429) | Some(503) => "throttled",
        Some(400..=499) => "client_error",
        Some(500..=599) => "server_error",
        Some(_) => "other",
        None => "transport_error",
    }
}

impl Intercept for S3Metrics {
    fn name(&self) -> &'static str {
        "keepfs-metrics"
    }

    fn read_before_execution(
        &self,
        _context: &BeforeSerializationInterceptorContextRef<'_>,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        cfg.interceptor_state().store_put(Started {
            at: Instant::now(),
            attempts: 0,
        });
        Ok(())
    }

    fn read_before_transmit(
        &self,
        context: &BeforeTransmitInterceptorContextRef<'_>,
        _runtime_components: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let m = get();
        if let Some(len) = context.request().body().content_length() {
            m.s3_sent_bytes.inc_by(len);
        }
        let mut started = cfg.load::<Started>().cloned().unwrap_or(Started {
            at: Instant::now(),
            attempts: 0,
        });
        if started.attempts > 0 {
            m.s3_retries
                .get_or_create(&S3OpLabels {
                    operation: operation(cfg),
                })
                .inc();
        }
        started.attempts += 1;
        cfg.interceptor_state().store_put(started);
        Ok(())
    }

    fn read_after_execution(
        &self,
        context: &FinalizerInterceptorContextRef<'_>,
        _runtime_components: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let m = get();
        let operation = operation(cfg);
        let failed = context.output_or_error().is_none_or(|r| r.is_err());
        let status = context.response().map(|r| r.status().as_u16());
        // An error with a 2xx status is a reply keepfs could not parse.
        let outcome = match (failed, outcome(status)) {
            (true, "ok") => "invalid_response",
            (_, outcome) => outcome,
        };
        if let Some(started) = cfg.load::<Started>() {
            m.s3_duration
                .get_or_create(&S3OpLabels {
                    operation: operation.clone(),
                })
                .observe(started.at.elapsed().as_secs_f64());
        }
        m.s3_requests
            .get_or_create(&S3Labels { operation, outcome })
            .inc();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::outcome;

    #[test]
    fn outcomes_by_status() {
        assert_eq!(outcome(Some(200)), "ok");
        assert_eq!(outcome(Some(206)), "ok");
        assert_eq!(outcome(Some(404)), "not_found");
        assert_eq!(outcome(Some(412)), "precondition_failed");
        assert_eq!(outcome(Some(503)), "throttled");
        assert_eq!(outcome(Some(500)), "server_error");
        assert_eq!(outcome(Some(400)), "client_error");
        assert_eq!(outcome(None), "transport_error");
    }
}
