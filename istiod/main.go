// Command istiod runs Istio's own config generator and xDS server on loopback, for tests.
//
// It wraps pilot/test/xds.NewFakeDiscoveryServer from the istio.io/istio module: real Istio
// config generation and push logic (the same code as pilot-discovery) over an in-memory
// Kubernetes client instead of an API server. Objects come from YAML: Kubernetes Services,
// EndpointSlices, Pods and Namespaces go to the in-memory client (so Services get cluster IPs
// and Istiod sees them as Kubernetes services); Istio kinds (VirtualService, DestinationRule,
// Sidecar, ServiceEntry, PeerAuthentication, ...) go to Istio's config store.
//
// Control API (plain HTTP on --control): POST /apply and POST /delete take YAML documents;
// GET /ready answers 200 once the first push context is built. The process prints one line,
// "READY ads=HOST:PORT control=HOST:PORT", when both ports are open.
package main

import (
	"bufio"
	"bytes"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"syscall"

	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/kubernetes/fake"
	"k8s.io/client-go/testing"

	"istio.io/istio/pilot/pkg/config/kube/crd"
	xdsfake "istio.io/istio/pilot/test/xds"
	"istio.io/istio/pkg/config"
	kubelib "istio.io/istio/pkg/kube"
	"istio.io/istio/pkg/log"
)

// failer satisfies Istio's test.Failer outside a Go test: a fatal error ends the process,
// cleanups run at shutdown.
type failer struct {
	mu       sync.Mutex
	cleanups []func()
}

func (f *failer) Fail()    { f.Fatal("failed") }
func (f *failer) FailNow() { f.Fatal("failed") }
func (f *failer) Fatal(args ...any) {
	fmt.Fprintln(os.Stderr, append([]any{"istiod: fatal:"}, args...)...)
	os.Exit(1)
}
func (f *failer) Fatalf(format string, args ...any) { f.Fatal(fmt.Sprintf(format, args...)) }
func (f *failer) Log(args ...any)                   { fmt.Fprintln(os.Stderr, args...) }
func (f *failer) Logf(format string, args ...any)   { fmt.Fprintf(os.Stderr, format+"\n", args...) }
func (f *failer) Helper()                           {}
func (f *failer) Skip(args ...any)                  { f.Fatal(args...) }
func (f *failer) TempDir() string {
	dir, err := os.MkdirTemp("", "istiod")
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(func() { _ = os.RemoveAll(dir) })
	return dir
}

func (f *failer) Cleanup(fn func()) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.cleanups = append(f.cleanups, fn)
}

func (f *failer) runCleanups() {
	f.mu.Lock()
	defer f.mu.Unlock()
	for i := len(f.cleanups) - 1; i >= 0; i-- {
		f.cleanups[i]()
	}
	f.cleanups = nil
}

// documents splits a YAML stream into its non-empty documents.
func documents(data []byte) []string {
	var out []string
	for _, doc := range strings.Split("\n"+string(data)+"\n", "\n---") {
		if strings.TrimSpace(doc) != "" && strings.Contains(doc, "kind:") {
			out = append(out, doc)
		}
	}
	return out
}

// objects separates Istio configs from Kubernetes objects.
func objects(data []byte) ([]config.Config, []runtime.Object, error) {
	var configs []config.Config
	var kube []runtime.Object
	decode := kubelib.IstioCodec.UniversalDeserializer().Decode
	for _, doc := range documents(data) {
		parsed, _, err := crd.ParseInputs(doc)
		if err == nil && len(parsed) == 1 {
			c := parsed[0]
			if c.Namespace == "" {
				c.Namespace = "default"
			}
			configs = append(configs, c)
			continue
		}
		obj, _, err := decode([]byte(doc), nil, nil)
		if err != nil {
			return nil, nil, fmt.Errorf("not an Istio config nor a Kubernetes object: %v", err)
		}
		kube = append(kube, obj)
	}
	return configs, kube, nil
}

func readDir(dir string) ([]byte, error) {
	if dir == "" {
		return nil, nil
	}
	paths, err := filepath.Glob(filepath.Join(dir, "*.yaml"))
	if err != nil {
		return nil, err
	}
	sort.Strings(paths)
	var all bytes.Buffer
	for _, p := range paths {
		data, err := os.ReadFile(p)
		if err != nil {
			return nil, err
		}
		all.WriteString("\n---\n")
		all.Write(data)
	}
	return all.Bytes(), nil
}

type mesh struct {
	mu  sync.Mutex
	srv *xdsfake.FakeDiscoveryServer
}

// kubeChange applies `change` to each Kubernetes object through the in-memory client's tracker,
// whose watches feed Istiod as an API server's would.
func (m *mesh) kubeChange(
	objs []runtime.Object,
	change func(t testing.ObjectTracker, gvr schema.GroupVersionResource, obj runtime.Object, o metav1.Object) error,
) error {
	cs, ok := m.srv.KubeClient().Kube().(*fake.Clientset)
	if !ok {
		return errors.New("the Kubernetes client is not the in-memory one")
	}
	for _, obj := range objs {
		gvk := obj.GetObjectKind().GroupVersionKind()
		gvr, _ := meta.UnsafeGuessKindToResource(gvk)
		o, err := meta.Accessor(obj)
		if err != nil {
			return err
		}
		if err := change(cs.Tracker(), gvr, obj, o); err != nil {
			return fmt.Errorf("%s %s/%s: %v", gvk.Kind, o.GetNamespace(), o.GetName(), err)
		}
	}
	return nil
}

// apply creates or updates every object; Istiod sees each change as it would from an API server.
func (m *mesh) apply(data []byte) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	configs, kube, err := objects(data)
	if err != nil {
		return err
	}
	store := m.srv.Store()
	for _, c := range configs {
		if store.Get(c.GroupVersionKind, c.Name, c.Namespace) == nil {
			_, err = store.Create(c)
		} else {
			_, err = store.Update(c)
		}
		if err != nil {
			return fmt.Errorf("%s %s/%s: %v", c.GroupVersionKind.Kind, c.Namespace, c.Name, err)
		}
	}
	return m.kubeChange(kube, func(t testing.ObjectTracker, gvr schema.GroupVersionResource, obj runtime.Object, o metav1.Object) error {
		if _, err := t.Get(gvr, o.GetNamespace(), o.GetName()); err == nil {
			return t.Update(gvr, obj, o.GetNamespace())
		}
		return t.Create(gvr, obj, o.GetNamespace())
	})
}

func (m *mesh) remove(data []byte) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	configs, kube, err := objects(data)
	if err != nil {
		return err
	}
	for _, c := range configs {
		if err := m.srv.Store().Delete(c.GroupVersionKind, c.Name, c.Namespace, nil); err != nil {
			return fmt.Errorf("%s %s/%s: %v", c.GroupVersionKind.Kind, c.Namespace, c.Name, err)
		}
	}
	return m.kubeChange(kube, func(t testing.ObjectTracker, gvr schema.GroupVersionResource, _ runtime.Object, o metav1.Object) error {
		return t.Delete(gvr, o.GetNamespace(), o.GetName())
	})
}

func (m *mesh) handler() http.Handler {
	mux := http.NewServeMux()
	change := func(fn func([]byte) error) http.HandlerFunc {
		return func(w http.ResponseWriter, r *http.Request) {
			if r.Method != http.MethodPost {
				http.Error(w, "POST YAML documents", http.StatusMethodNotAllowed)
				return
			}
			body, err := io.ReadAll(io.LimitReader(r.Body, 64<<20))
			if err == nil {
				err = fn(body)
			}
			if err != nil {
				http.Error(w, err.Error(), http.StatusBadRequest)
				return
			}
			_, _ = io.WriteString(w, "ok\n")
		}
	}
	mux.HandleFunc("/apply", change(m.apply))
	mux.HandleFunc("/delete", change(m.remove))
	mux.HandleFunc("/ready", func(w http.ResponseWriter, _ *http.Request) { _, _ = io.WriteString(w, "ok\n") })
	return mux
}

func main() {
	adsAddr := flag.String("listen", "127.0.0.1:0", "ADS (gRPC, plaintext) address")
	controlAddr := flag.String("control", "127.0.0.1:0", "control API (HTTP) address")
	dir := flag.String("config", "", "directory of YAML files (Kubernetes objects and Istio configs) loaded at start")
	verbose := flag.Bool("v", false, "Istio's own logs at info (default: warnings and errors)")
	flag.Parse()
	logs := log.DefaultOptions()
	logs.OutputPaths = []string{"stderr"}
	if !*verbose {
		logs.SetDefaultOutputLevel(log.DefaultScopeName, log.WarnLevel)
		for _, scope := range log.Scopes() {
			scope.SetOutputLevel(log.WarnLevel)
		}
	}
	if err := log.Configure(logs); err != nil {
		fmt.Fprintf(os.Stderr, "istiod: logging: %v\n", err)
		os.Exit(2)
	}

	initial, err := readDir(*dir)
	if err == nil {
		_, _, err = objects(initial)
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "istiod: --config %s: %v\n", *dir, err)
		os.Exit(2)
	}
	configs, kube, _ := objects(initial)

	ads, err := net.Listen("tcp", *adsAddr)
	if err != nil {
		fmt.Fprintf(os.Stderr, "istiod: --listen %s: %v\n", *adsAddr, err)
		os.Exit(2)
	}
	control, err := net.Listen("tcp", *controlAddr)
	if err != nil {
		fmt.Fprintf(os.Stderr, "istiod: --control %s: %v\n", *controlAddr, err)
		os.Exit(2)
	}
	t := &failer{}
	srv := xdsfake.NewFakeDiscoveryServer(t, xdsfake.FakeOptions{
		Configs:           configs,
		KubernetesObjects: kube,
		ListenerBuilder:   func() (net.Listener, error) { return ads, nil },
	})
	m := &mesh{srv: srv}
	go func() { _ = http.Serve(control, m.handler()) }()

	out := bufio.NewWriter(os.Stdout)
	fmt.Fprintf(out, "READY ads=%s control=%s\n", ads.Addr(), control.Addr())
	_ = out.Flush()

	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM)
	<-sig
	t.runCleanups()
}
