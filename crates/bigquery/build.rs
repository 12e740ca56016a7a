//! Generates a BigQueryWrite *server* (for the in-process test double in `src/testing.rs`) from the message types of
//! the googleapis crate: no .proto files or protoc needed.

fn main() {
    use tonic_build::manual::{Builder, Method, Service};
    const PB: &str = "googleapis_tonic_google_cloud_bigquery_storage_v1::google::cloud::bigquery::storage::v1";
    let method = |name: &str, route: &str, input: &str, output: &str| {
        Method::builder()
            .name(name)
            .route_name(route)
            .input_type(format!("{PB}::{input}"))
            .output_type(format!("{PB}::{output}"))
            .codec_path("tonic_prost::ProstCodec")
    };
    let service = Service::builder()
        .name("BigQueryWrite")
        .package("google.cloud.bigquery.storage.v1")
        .method(method("create_write_stream", "CreateWriteStream", "CreateWriteStreamRequest", "WriteStream").build())
        .method(
            method("append_rows", "AppendRows", "AppendRowsRequest", "AppendRowsResponse")
                .client_streaming()
                .server_streaming()
                .build(),
        )
        .method(method("get_write_stream", "GetWriteStream", "GetWriteStreamRequest", "WriteStream").build())
        .method(
            method(
                "finalize_write_stream",
                "FinalizeWriteStream",
                "FinalizeWriteStreamRequest",
                "FinalizeWriteStreamResponse",
            )
            .build(),
        )
        .method(
            method(
                "batch_commit_write_streams",
                "BatchCommitWriteStreams",
                "BatchCommitWriteStreamsRequest",
                "BatchCommitWriteStreamsResponse",
            )
            .build(),
        )
        .method(method("flush_rows", "FlushRows", "FlushRowsRequest", "FlushRowsResponse").build())
        .build();
    Builder::new().build_client(false).build_server(true).compile(&[service]);
}
