//! Kafka request/response framing and the request fields policy needs (issue 5; being written).
