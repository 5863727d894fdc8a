// agentk_like dials agentgate the way GitLab's agentk dials kas (constructKasConnection), with
// the grpc-go and nhooyr.io/websocket that Debian packages, and then acts as a minimal agent:
// grpc.health.v1 Check, AgentSession.Register, and Tunnel.Connect streams that each serve one
// tunnelled HTTP request. It is an independent client for the compatibility suite: it shares
// no code with agentgate's own agent, only the .proto files.
//
// What it copies from agentk, per scheme:
//   - grpc/grpcs: target "dns:host:port" (grpc-go 1.33 spells it "dns:///host:port") with the
//     round_robin balancer, so one connection per resolved address; TLS for grpcs only.
//   - ws/wss: a context dialer that opens the WebSocket (subprotocol "ws-tunnel", binary
//     messages, no compression, 10 MiB read limit, redirects not followed, HTTP(S)_PROXY
//     honoured, Authorization and User-Agent on the upgrade, extra -header values), TLS done by
//     a plain http.Transport so no ALPN is offered, and the whole URL as the gRPC target, so
//     grpc-go sends the URL as :authority. agentk writes "passthrough:"+URL for newer grpc-go;
//     grpc-go 1.33 (Debian's) spells the same resolver "passthrough:///"+URL, which produces
//     the same :authority and dial address.
//   - every call: gzip as the default compressor, User-Agent gitlab-agent/<version>/<commit>,
//     the token as "authorization: Bearer" metadata, keepalive 55 s with PermitWithoutStream,
//     grpc-go's default backoff with a 20 s MinConnectTimeout.
//
// It prints one JSON object per line on stdout: {"step": ..., ...}. Exit status 0 means every
// step it was asked to run succeeded.
package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"io/ioutil"
	"net"
	"net/http"
	"net/url"
	"os"
	"strings"
	"sync"
	"time"

	pb "agentgatepb"

	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/credentials"
	_ "google.golang.org/grpc/encoding/gzip"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/status"
	"nhooyr.io/websocket"
)

const (
	wsSubprotocol  = "ws-tunnel"
	maxMessageSize = 10 * 1024 * 1024
)

type headerList []string

func (h *headerList) String() string     { return strings.Join(*h, ",") }
func (h *headerList) Set(v string) error { *h = append(*h, v); return nil }

var (
	serverURL  = flag.String("url", "", "gateway URL: grpc://, grpcs://, ws:// or wss://")
	tokenFile  = flag.String("token-file", "", "file with the agent token")
	caFile     = flag.String("ca", "", "PEM CA bundle for grpcs and wss")
	tunnels    = flag.Int("tunnels", 0, "tunnel streams to serve one request each; 0 = none")
	holdFor    = flag.Duration("hold", 0, "keep the session open this long after the other steps")
	compressor = flag.String("compressor", "gzip", "default call compressor (agentk: gzip); empty = none")
	keepalive_ = flag.Duration("keepalive", 55*time.Second, "client PING interval (agentk: 55s)")
	version    = flag.String("version", "v17.0.0", "version in the User-Agent")
	conns      = flag.Int("connections", 1, "connections to open, each with its session and tunnels: "+
		"agentk's round_robin opens one per address its name resolves to")
	extra      headerList
	printMu    sync.Mutex
)

func emit(step string, fields map[string]interface{}) {
	if fields == nil {
		fields = map[string]interface{}{}
	}
	fields["step"] = step
	b, _ := json.Marshal(fields)
	printMu.Lock()
	defer printMu.Unlock()
	fmt.Println(string(b))
}

func fail(step string, err error) {
	st, _ := status.FromError(err)
	emit(step, map[string]interface{}{"ok": false, "error": err.Error(), "code": st.Code().String()})
	os.Exit(1)
}

// tokenCredentials is agentk's grpctool.NewTokenCredentials: the token on every RPC, allowed
// without transport security because ws and wss hide their TLS from gRPC.
type tokenCredentials struct {
	token    string
	insecure bool
}

func (t tokenCredentials) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	return map[string]string{"authorization": "Bearer " + t.token}, nil
}
func (t tokenCredentials) RequireTransportSecurity() bool { return !t.insecure }

func tlsConfig() *tls.Config {
	cfg := &tls.Config{MinVersion: tls.VersionTLS12}
	if *caFile != "" {
		pem, err := ioutil.ReadFile(*caFile)
		if err != nil {
			fail("setup", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			fail("setup", errors.New("no certificates in -ca file"))
		}
		cfg.RootCAs = pool
	}
	return cfg
}

// wsDialer is agentk's wstunnel.DialerForGRPC: each gRPC connection is one WebSocket, seen as
// a byte stream of binary messages.
func wsDialer(header http.Header) func(context.Context, string) (net.Conn, error) {
	dialer := &net.Dialer{Timeout: 5 * time.Second, KeepAlive: 30 * time.Second}
	client := &http.Client{
		Transport: &http.Transport{
			Proxy:                 http.ProxyFromEnvironment,
			DialContext:           dialer.DialContext,
			TLSClientConfig:       tlsConfig(), // no NextProtos: no ALPN at all, as agentk
			MaxIdleConns:          10,
			IdleConnTimeout:       90 * time.Second,
			TLSHandshakeTimeout:   10 * time.Second,
			ResponseHeaderTimeout: 20 * time.Second,
			ExpectContinueTimeout: 1 * time.Second,
		},
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
	}
	return func(ctx context.Context, address string) (net.Conn, error) {
		conn, resp, err := websocket.Dial(ctx, address, &websocket.DialOptions{
			HTTPClient:      client,
			HTTPHeader:      header,
			Subprotocols:    []string{wsSubprotocol},
			CompressionMode: websocket.CompressionDisabled,
		})
		if err != nil {
			if resp != nil {
				body, _ := ioutil.ReadAll(io.LimitReader(resp.Body, 512))
				err = fmt.Errorf("%v (HTTP %d: %s)", err, resp.StatusCode, strings.TrimSpace(string(body)))
			}
			return nil, err
		}
		conn.SetReadLimit(maxMessageSize)
		return websocket.NetConn(context.Background(), conn, websocket.MessageBinary), nil
	}
}

func dial(ctx context.Context, token string) *grpc.ClientConn {
	u, err := url.Parse(*serverURL)
	if err != nil {
		fail("setup", err)
	}
	userAgent := fmt.Sprintf("gitlab-agent/%s/abc1234", *version)
	secure := u.Scheme == "grpcs"
	opts := []grpc.DialOption{
		grpc.WithConnectParams(grpc.ConnectParams{Backoff: backoff.DefaultConfig, MinConnectTimeout: 20 * time.Second}),
		grpc.WithPerRPCCredentials(tokenCredentials{token: token, insecure: !secure}),
		grpc.WithUserAgent(userAgent),
		grpc.WithKeepaliveParams(keepalive.ClientParameters{Time: *keepalive_, PermitWithoutStream: true}),
	}
	if *compressor != "" {
		opts = append(opts, grpc.WithDefaultCallOptions(grpc.UseCompressor(*compressor)))
	}
	var target string
	switch u.Scheme {
	case "ws", "wss":
		header := http.Header{}
		header.Set("Authorization", "Bearer "+token)
		header.Set("User-Agent", userAgent)
		for _, h := range extra {
			kv := strings.SplitN(h, ":", 2)
			if len(kv) == 2 {
				header.Add(strings.TrimSpace(kv[0]), strings.TrimSpace(kv[1]))
			}
		}
		target = "passthrough:///" + u.String()
		opts = append(opts, grpc.WithContextDialer(wsDialer(header)), grpc.WithInsecure())
	case "grpc", "grpcs":
		port := u.Port()
		if port == "" {
			port = "443"
		}
		// agentk writes "dns:"+host:port for newer grpc-go; 1.33 needs "dns:///".
		target = "dns:///" + net.JoinHostPort(u.Hostname(), port)
		opts = append(opts, grpc.WithDefaultServiceConfig(`{"loadBalancingConfig":[{"round_robin":{}}]}`))
		if secure {
			opts = append(opts, grpc.WithTransportCredentials(credentials.NewTLS(tlsConfig())))
		} else {
			opts = append(opts, grpc.WithInsecure())
		}
	default:
		fail("setup", fmt.Errorf("unsupported scheme %q", u.Scheme))
	}
	emit("dial", map[string]interface{}{"ok": true, "target": target})
	conn, err := grpc.DialContext(ctx, target, opts...)
	if err != nil {
		fail("dial", err)
	}
	return conn
}

// serveTunnel parks one tunnel stream and answers the one request it carries with a body
// that echoes what it received, so the test can check both directions.
func serveTunnel(ctx context.Context, client pb.TunnelClient, instance string, n int) error {
	stream, err := client.Connect(ctx)
	if err != nil {
		return err
	}
	if err := stream.Send(&pb.AgentMessage{Msg: &pb.AgentMessage_Descriptor_{Descriptor_: &pb.Descriptor{
		InstanceId: instance, HttpUpstreams: []string{"default"},
	}}}); err != nil {
		return err
	}
	var head *pb.RequestHead
	received := 0
	for {
		msg, err := stream.Recv()
		if err != nil {
			return fmt.Errorf("tunnel %d: %v", n, err)
		}
		switch m := msg.Msg.(type) {
		case *pb.GatewayMessage_Heartbeat:
			if err := stream.Send(&pb.AgentMessage{Msg: &pb.AgentMessage_Heartbeat{Heartbeat: m.Heartbeat}}); err != nil {
				return err
			}
			continue
		case *pb.GatewayMessage_RequestHead:
			head = m.RequestHead
			emit("tunnel_request", map[string]interface{}{"ok": true, "tunnel": n, "method": head.Method, "path": head.PathAndQuery})
			continue
		case *pb.GatewayMessage_Chunk:
			received += len(m.Chunk.Data)
			continue
		case *pb.GatewayMessage_EndOfRequest:
		}
		break
	}
	body := fmt.Sprintf("agentk-like served %s %s after %d request bytes\n", head.Method, head.PathAndQuery, received)
	// Repeat the line to a body large enough that compression and several chunks matter.
	big := strings.Repeat(body, 2000)
	if err := stream.Send(&pb.AgentMessage{Msg: &pb.AgentMessage_ResponseHead{ResponseHead: &pb.ResponseHead{
		Status: 200,
		Headers: []*pb.Header{
			{Name: "content-type", Value: []byte("text/plain")},
			{Name: "x-served-by", Value: []byte("agentk-like")},
			{Name: "x-request-bytes", Value: []byte(fmt.Sprint(received))},
		},
	}}}); err != nil {
		return err
	}
	for off := 0; off < len(big); off += 16 * 1024 {
		end := off + 16*1024
		if end > len(big) {
			end = len(big)
		}
		if err := stream.Send(&pb.AgentMessage{Msg: &pb.AgentMessage_Chunk{Chunk: &pb.Chunk{Data: []byte(big[off:end])}}}); err != nil {
			return err
		}
	}
	if err := stream.Send(&pb.AgentMessage{Msg: &pb.AgentMessage_Trailer{Trailer: &pb.Trailer{}}}); err != nil {
		return err
	}
	// The gateway ends its side after our trailer; wait for that before letting go.
	for {
		if _, err := stream.Recv(); err != nil {
			break
		}
	}
	emit("tunnel_done", map[string]interface{}{"ok": true, "tunnel": n, "request_bytes": received, "response_bytes": len(big)})
	return nil
}

func main() {
	flag.Var(&extra, "header", "extra 'Name: value' header on the WebSocket upgrade (agentk's --kas-header)")
	flag.Parse()
	raw, err := ioutil.ReadFile(*tokenFile)
	if err != nil {
		fail("setup", err)
	}
	token := strings.TrimSpace(string(raw))
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var wg sync.WaitGroup
	for c := 0; c < *conns; c++ {
		wg.Add(1)
		go func(c int) {
			defer wg.Done()
			runConnection(ctx, token, c)
		}(c)
	}
	wg.Wait()
	if *holdFor > 0 {
		time.Sleep(*holdFor)
	}
	emit("done", map[string]interface{}{"ok": true})
}

// runConnection dials one connection and runs every step on it; any failure ends the process.
func runConnection(ctx context.Context, token string, c int) {
	conn := dial(ctx, token)
	hctx, hcancel := context.WithTimeout(ctx, 15*time.Second)
	resp, err := healthpb.NewHealthClient(conn).Check(hctx, &healthpb.HealthCheckRequest{}, grpc.WaitForReady(true))
	hcancel()
	if err != nil {
		fail("health", err)
	}
	emit("health", map[string]interface{}{"ok": true, "status": resp.Status.String(), "connection_index": c})

	instance := fmt.Sprintf("agentk-like-%d-%d", os.Getpid(), c)
	session, err := pb.NewAgentSessionClient(conn).Register(ctx, &pb.RegisterRequest{
		InstanceId: instance, Version: "gitlab-agent/" + *version, Hostname: "agentk-like",
	})
	if err != nil {
		fail("register", err)
	}
	first, err := session.Recv()
	if err != nil {
		fail("register", err)
	}
	reg := first.GetRegistered()
	if reg == nil {
		fail("register", errors.New("first session event is not 'registered'"))
	}
	emit("register", map[string]interface{}{"ok": true, "agent": reg.AgentName, "transport": reg.Transport,
		"connection": reg.ConnectionId, "connection_index": c})
	go func() {
		for {
			if _, err := session.Recv(); err != nil {
				return
			}
		}
	}()

	if *tunnels > 0 {
		client := pb.NewTunnelClient(conn)
		errs := make(chan error, *tunnels)
		for i := 0; i < *tunnels; i++ {
			go func(i int) { errs <- serveTunnel(ctx, client, instance, c*1000+i) }(i)
		}
		emit("tunnels_parked", map[string]interface{}{"ok": true, "count": *tunnels, "connection_index": c})
		for i := 0; i < *tunnels; i++ {
			if err := <-errs; err != nil {
				fail("tunnel", err)
			}
		}
	}
	if *holdFor > 0 {
		time.Sleep(*holdFor)
	}
	conn.Close()
}
