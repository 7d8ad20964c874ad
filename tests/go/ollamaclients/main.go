// Command ollamaclients runs the reading side of Ollama's Go parents against a runner, so that the
// tests check our wire with Go's own decoder and Ollama's own loops, not a Python reading of them.
//
// The types and loops below are copied from Ollama (the ollama/ollama repository at 4713800b0^):
// x/mlxrunner/client.go (Client.Completion, Ping, Tokenize and their structs), x/imagegen/server.go
// (Server.Completion, Ping), llm/server.go at 9db4bdbad^ (llmServer.getServerStatus, ServerStatus),
// api/types.go (StatusError) and llm's Logprob. Only what ties them to the rest of Ollama (the
// subprocess, the scheduler, slog) is left out; what they decode and how they decide is unchanged.
//
// Usage: ollamaclients <check> <port> [json request]; prints one JSON result on stdout.
package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"strconv"
	"strings"
	"time"
)

// --- api/types.go ---

type StatusError struct {
	StatusCode   int
	Status       string
	ErrorMessage string `json:"error"`
}

func (e StatusError) Error() string {
	switch {
	case e.Status != "" && e.ErrorMessage != "":
		return fmt.Sprintf("%s: %s", e.Status, e.ErrorMessage)
	case e.Status != "":
		return e.Status
	case e.ErrorMessage != "":
		return e.ErrorMessage
	default:
		return "something went wrong, please see the ollama server logs for details"
	}
}

// --- llm ---

type TokenLogprob struct {
	Token   string  `json:"token"`
	Logprob float64 `json:"logprob"`
}

type Logprob struct {
	TokenLogprob
	TopLogprobs []TokenLogprob `json:"top_logprobs,omitempty"`
}

// --- x/mlxrunner/client.go ---

type CompletionRequest struct {
	Prompt      string
	Options     map[string]any // api.Options: snake_case tags, omitempty
	Logprobs    bool
	TopLogprobs int
}

type CompletionResponse struct {
	Content    string
	Done       bool
	DoneReason int

	PromptEvalCount    int
	PromptEvalDuration time.Duration
	EvalCount          int
	EvalDuration       time.Duration

	Logprobs []Logprob

	Error *StatusError
}

type statusResponse struct {
	Status        int
	Progress      int
	ContextLength int
	Memory        uint64
}

func mlxPing(ctx context.Context, port int) (statusResponse, error) {
	var status statusResponse
	reqURL := fmt.Sprintf("http://127.0.0.1:%d/v1/status", port)
	req, err := http.NewRequestWithContext(ctx, "GET", reqURL, nil)
	if err != nil {
		return status, err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return status, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return status, fmt.Errorf("health check failed: %d", resp.StatusCode)
	}
	err = json.NewDecoder(resp.Body).Decode(&status)
	return status, err
}

func mlxCompletion(ctx context.Context, port int, creq CompletionRequest, fn func(CompletionResponse)) error {
	body, err := json.Marshal(creq)
	if err != nil {
		return err
	}
	httpURL := fmt.Sprintf("http://127.0.0.1:%d/completion", port)
	httpReq, err := http.NewRequestWithContext(ctx, "POST", httpURL, strings.NewReader(string(body)))
	if err != nil {
		return err
	}
	httpReq.Header.Set("Content-Type", "application/json")
	resp, err := http.DefaultClient.Do(httpReq)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		respBody, _ := io.ReadAll(resp.Body)
		return StatusError{StatusCode: resp.StatusCode, ErrorMessage: strings.TrimSpace(string(respBody))}
	}
	scanner := bufio.NewScanner(resp.Body)
	for scanner.Scan() {
		var raw CompletionResponse
		if err := json.Unmarshal(scanner.Bytes(), &raw); err != nil {
			continue
		}
		if raw.Error != nil {
			return *raw.Error
		}
		fn(raw)
		if raw.Done {
			return nil
		}
	}
	return scanner.Err()
}

func mlxTokenize(ctx context.Context, port int, content string) ([]int, error) {
	reqURL := fmt.Sprintf("http://127.0.0.1:%d/v1/tokenize", port)
	req, err := http.NewRequestWithContext(ctx, "POST", reqURL, strings.NewReader(content))
	if err != nil {
		return nil, err
	}
	req.Header.Set("Content-Type", "text/plain")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	var tokens []int
	if err := json.NewDecoder(resp.Body).Decode(&tokens); err != nil {
		return nil, err
	}
	return tokens, nil
}

// --- x/imagegen/server.go ---

type imageLine struct {
	Image              string `json:"image,omitempty"`
	Content            string `json:"content,omitempty"`
	Done               bool   `json:"done"`
	Step               int    `json:"step,omitempty"`
	Total              int    `json:"total,omitempty"`
	StopReason         string `json:"stop_reason,omitempty"`
	PromptEvalCount    int    `json:"prompt_eval_count,omitempty"`
	PromptEvalDuration int    `json:"prompt_eval_duration,omitempty"`
	EvalCount          int    `json:"eval_count,omitempty"`
	EvalDuration       int    `json:"eval_duration,omitempty"`
}

func imagePing(ctx context.Context, port int) error {
	url := fmt.Sprintf("http://127.0.0.1:%d/health", port)
	req, err := http.NewRequestWithContext(ctx, "GET", url, nil)
	if err != nil {
		return err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("health check failed: %d", resp.StatusCode)
	}
	return nil
}

func imageCompletion(ctx context.Context, port int, request map[string]any, fn func(imageLine)) error {
	body, err := json.Marshal(request)
	if err != nil {
		return err
	}
	httpReq, err := http.NewRequestWithContext(ctx, "POST", fmt.Sprintf("http://127.0.0.1:%d/completion", port),
		strings.NewReader(string(body)))
	if err != nil {
		return err
	}
	httpReq.Header.Set("Content-Type", "application/json")
	resp, err := http.DefaultClient.Do(httpReq)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		body, _ := io.ReadAll(resp.Body)
		return fmt.Errorf("%s", strings.TrimSpace(string(body)))
	}
	scanner := bufio.NewScanner(resp.Body)
	scanner.Buffer(make([]byte, 1024*1024), 16*1024*1024)
	for scanner.Scan() {
		var raw imageLine
		if err := json.Unmarshal(scanner.Bytes(), &raw); err != nil {
			continue
		}
		fn(raw)
		if raw.Done {
			return nil
		}
	}
	if err := scanner.Err(); err != nil {
		return err
	}
	return errors.New("mlx runner closed response before completion")
}

// --- llm/server.go (llmServer, before 9db4bdbad) ---

type ServerStatus int

const (
	ServerStatusReady ServerStatus = iota
	ServerStatusNoSlotsAvailable
	ServerStatusLaunched
	ServerStatusLoadingModel
	ServerStatusNotResponding
	ServerStatusError
)

type ServerStatusResponse struct {
	Status   ServerStatus `json:"status"`
	Progress float32      `json:"progress"`
}

func getServerStatus(ctx context.Context, port int) (ServerStatus, float32, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, fmt.Sprintf("http://127.0.0.1:%d/health", port), nil)
	if err != nil {
		return ServerStatusError, 0, err
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return ServerStatusError, 0, fmt.Errorf("health resp: %w", err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return ServerStatusError, 0, err
	}
	var ssr ServerStatusResponse
	if err := json.Unmarshal(body, &ssr); err != nil {
		return ServerStatusError, 0, fmt.Errorf("health unmarshal encode response: %w", err)
	}
	switch ssr.Status {
	case ServerStatusLoadingModel:
		return ssr.Status, ssr.Progress, nil
	case ServerStatusLaunched, ServerStatusReady, ServerStatusNoSlotsAvailable:
		return ssr.Status, ssr.Progress, nil
	default:
		return ssr.Status, ssr.Progress, fmt.Errorf("server error: %+v", ssr)
	}
}

// --- the checks ---

func errText(err error) any {
	if err == nil {
		return nil
	}
	return err.Error()
}

func main() {
	check, port := os.Args[1], 0
	port, _ = strconv.Atoi(os.Args[2])
	ctx := context.Background()
	result := map[string]any{}
	switch check {
	case "mlx-status":
		status, err := mlxPing(ctx, port)
		result["status"], result["error"] = status, errText(err)
	case "mlx-tokenize":
		tokens, err := mlxTokenize(ctx, port, os.Args[3])
		result["tokens"], result["error"] = tokens, errText(err)
	case "mlx-completion":
		var creq CompletionRequest
		if err := json.Unmarshal([]byte(os.Args[3]), &creq); err != nil {
			panic(err)
		}
		var lines []CompletionResponse
		err := mlxCompletion(ctx, port, creq, func(r CompletionResponse) { lines = append(lines, r) })
		result["lines"], result["error"] = lines, errText(err)
	case "image-ping":
		result["error"] = errText(imagePing(ctx, port))
	case "image-completion":
		var request map[string]any
		if err := json.Unmarshal([]byte(os.Args[3]), &request); err != nil {
			panic(err)
		}
		var lines []imageLine
		err := imageCompletion(ctx, port, request, func(r imageLine) { lines = append(lines, r) })
		result["lines"], result["error"] = lines, errText(err)
	case "llmserver-status":
		status, progress, err := getServerStatus(ctx, port)
		result["status"], result["progress"], result["error"] = int(status), progress, errText(err)
	default:
		panic("unknown check " + check)
	}
	out, _ := json.Marshal(result)
	fmt.Println(string(out))
}
