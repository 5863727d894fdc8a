// The grpc-go job backend of `agentgate bench backends` (see grpc_go_backend.rs): the same
// /bench.jobs.v1.Jobs/Get as the hyper backend (the request's message answered back), on the
// gRPC library a real job router is most likely written with. A codec of raw bytes stands in
// for protobuf, so no generated code is needed and the build stays offline.
package main

import (
	"context"
	"flag"
	"net"
	"os"

	"google.golang.org/grpc"
	"google.golang.org/grpc/encoding"
)

type rawCodec struct{}

func (rawCodec) Marshal(v interface{}) ([]byte, error) { return *(v.(*[]byte)), nil }
func (rawCodec) Unmarshal(data []byte, v interface{}) error {
	*(v.(*[]byte)) = append([]byte(nil), data...)
	return nil
}
func (rawCodec) Name() string { return "proto" }

func get(_ interface{}, _ context.Context, dec func(interface{}) error, _ grpc.UnaryServerInterceptor) (interface{}, error) {
	var in []byte
	if err := dec(&in); err != nil {
		return nil, err
	}
	return &in, nil
}

func main() {
	listen := flag.String("listen", "127.0.0.1:0", "address to serve on")
	flag.Parse()
	encoding.RegisterCodec(rawCodec{})
	l, err := net.Listen("tcp", *listen)
	if err != nil {
		os.Stderr.WriteString("cannot listen: " + err.Error() + "\n")
		os.Exit(1)
	}
	// As the hyper backend: the gateway opens another connection past 100 calls on one.
	s := grpc.NewServer(grpc.MaxConcurrentStreams(1000))
	s.RegisterService(&grpc.ServiceDesc{
		ServiceName: "bench.jobs.v1.Jobs",
		HandlerType: (*interface{})(nil),
		Methods:     []grpc.MethodDesc{{MethodName: "Get", Handler: get}},
	}, struct{}{})
	if err := s.Serve(l); err != nil {
		os.Stderr.WriteString("serve: " + err.Error() + "\n")
		os.Exit(1)
	}
}
