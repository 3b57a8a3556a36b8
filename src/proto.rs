//! Wire types generated from `proto/` (etcd's API, field for field, and
//! keelson's own `RaftCommand`).
#![allow(clippy::all, missing_docs, non_camel_case_types)]

pub mod mvccpb {
    include!(concat!(env!("OUT_DIR"), "/mvccpb.rs"));
    include!(concat!(env!("OUT_DIR"), "/mvccpb.serde.rs"));
}
pub mod authpb {
    include!(concat!(env!("OUT_DIR"), "/authpb.rs"));
    include!(concat!(env!("OUT_DIR"), "/authpb.serde.rs"));
}
pub mod etcdserverpb {
    include!(concat!(env!("OUT_DIR"), "/etcdserverpb.rs"));
    include!(concat!(env!("OUT_DIR"), "/etcdserverpb.serde.rs"));
}
pub mod v3lockpb {
    include!(concat!(env!("OUT_DIR"), "/v3lockpb.rs"));
    include!(concat!(env!("OUT_DIR"), "/v3lockpb.serde.rs"));
}
pub mod v3electionpb {
    include!(concat!(env!("OUT_DIR"), "/v3electionpb.rs"));
    include!(concat!(env!("OUT_DIR"), "/v3electionpb.serde.rs"));
}
pub mod keelson {
    include!(concat!(env!("OUT_DIR"), "/keelson.rs"));
}
pub mod grpc {
    pub mod health {
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/grpc.health.v1.rs"));
        }
    }
}
pub use grpc::health::v1 as health;

#[cfg(test)]
mod tests {
    use super::etcdserverpb::*;
    use prost::Message;

    /// Field numbers are the wire contract with every etcd client.
    #[test]
    fn put_request_wire_bytes() {
        let p = PutRequest {
            key: b"k".to_vec().into(),
            value: b"v".to_vec().into(),
            lease: 5,
            prev_kv: true,
            ..Default::default()
        };
        assert_eq!(
            p.encode_to_vec(),
            vec![0x0a, 1, b'k', 0x12, 1, b'v', 0x18, 5, 0x20, 1]
        );
        let op = RequestOp {
            request: Some(request_op::Request::RequestPut(PutRequest::default())),
        };
        assert_eq!(op.encode_to_vec(), vec![0x12, 0]);
        let c = Compare {
            range_end: b"z".to_vec(),
            ..Default::default()
        };
        // range_end is field 64: tag (64 << 3 | 2) = 514 = varint 0x82 0x04.
        assert_eq!(c.encode_to_vec(), vec![0x82, 0x04, 1, b'z']);
    }
}
