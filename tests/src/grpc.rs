//! The OTLP/gRPC side of the test receiver: tonic's generated services for traces, metrics and
//! logs, feeding the same state as the HTTP receiver.

use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};

use opentelemetry_proto::tonic::collector::logs::v1::logs_service_server::{LogsService, LogsServiceServer};
use opentelemetry_proto::tonic::collector::logs::v1::{ExportLogsServiceRequest, ExportLogsServiceResponse};
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{ExportMetricsServiceRequest, ExportMetricsServiceResponse};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use prost::Message;
use tokio::sync::oneshot;
use tonic::{Code, Request, Response, Status};

use crate::collector::{receive, Answer, Reply, State};

#[derive(Clone)]
struct Receiver {
    state: Arc<Mutex<State>>,
    answer: Arc<Mutex<Answer>>,
}

impl Receiver {
    fn export<Req: Message, Resp: Message + Default>(
        &self,
        path: &str,
        req: Request<Req>,
    ) -> Result<Response<Resp>, Status> {
        let headers = req
            .metadata()
            .iter()
            .filter_map(|kv| match kv {
                tonic::metadata::KeyAndValueRef::Ascii(k, v) => Some((k.to_string(), v.to_str().ok()?.to_string())),
                tonic::metadata::KeyAndValueRef::Binary(..) => None,
            })
            .collect();
        let body = req.into_inner().encode_to_vec();
        // receive() may sleep (Answer::DelayMs): keep it off the async workers.
        let reply = tokio::task::block_in_place(|| {
            receive(path, "application/grpc", headers, &body, &self.state, &self.answer)
        });
        match reply {
            Reply::Accepted(bytes) => Ok(Response::new(Resp::decode(bytes.as_slice()).unwrap_or_default())),
            Reply::Garbage => Ok(Response::new(Resp::default())),
            Reply::Refused(Answer::Grpc(code)) => Err(Status::new(Code::from(code), "refused by the test")),
            Reply::Refused(_) => Err(Status::internal("refused by the test")),
        }
    }
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        req: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        Receiver::export(self, "/v1/traces", req)
    }
}

#[tonic::async_trait]
impl MetricsService for Receiver {
    async fn export(
        &self,
        req: Request<ExportMetricsServiceRequest>,
    ) -> Result<Response<ExportMetricsServiceResponse>, Status> {
        Receiver::export(self, "/v1/metrics", req)
    }
}

#[tonic::async_trait]
impl LogsService for Receiver {
    async fn export(
        &self,
        req: Request<ExportLogsServiceRequest>,
    ) -> Result<Response<ExportLogsServiceResponse>, Status> {
        Receiver::export(self, "/v1/logs", req)
    }
}

/// A tonic server on 127.0.0.1; stops when dropped.
pub(crate) struct GrpcServer {
    /// Port it listens on.
    pub port: u16,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl GrpcServer {
    pub(crate) fn start(state: Arc<Mutex<State>>, answer: Arc<Mutex<Answer>>) -> GrpcServer {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("address").port();
        listener.set_nonblocking(true).expect("nonblocking");
        let (tx, rx) = oneshot::channel();
        let receiver = Receiver { state, answer };
        let thread = thread::spawn(move || {
            let rt =
                tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
                let _ = tonic::transport::Server::builder()
                    .add_service(TraceServiceServer::new(receiver.clone()))
                    .add_service(MetricsServiceServer::new(receiver.clone()))
                    .add_service(LogsServiceServer::new(receiver))
                    .serve_with_incoming_shutdown(tokio_stream::wrappers::TcpListenerStream::new(listener), async {
                        let _ = rx.await;
                    })
                    .await;
            });
        });
        GrpcServer { port, shutdown: Some(tx), thread: Some(thread) }
    }
}

impl Drop for GrpcServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
